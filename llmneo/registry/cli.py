"""llmneo registry: find models by name, version or alias, see where they came from, pull them.

    llmneo registry ls                                   # every model: versions, newest, aliases
    llmneo registry ls smollm2-neo                       # its versions, sizes, aliases, key metrics
    llmneo registry show smollm2-neo@production          # one version (NAME, NAME:VERSION, NAME@ALIAS)
    llmneo registry pull smollm2-neo@production models/prod   # download, verify every sha256
    llmneo registry promote smollm2-neo:v3 production    # move an alias (history kept)
    llmneo registry lineage smollm2-neo:v3               # run id, git commit, config/dataset hash, …
    llmneo registry history smollm2-neo [ALIAS]          # every alias move

The registry is --registry URI, else $LLMNEO_REGISTRY, else registry.uri of --preset.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.registry import ENV_URI, LocalRegistry, open_registry, registry_uri
from llmneo.registry.core import _size
from llmneo.report import table


def _registry(args):
    config_uri, settings = None, None
    if not args.registry:
        settings = load_config(args.preset).registry
        config_uri = settings.uri
    uri = registry_uri(args.registry, config_uri)
    if settings is not None and uri == settings.uri:
        return open_registry(settings)
    return open_registry(uri)


def _flag_problems(reg) -> None:
    """One stderr line per damaged registry object the command skipped (the rest was listed)."""
    for line in reg.problems:
        print(f"warning: {line}", file=sys.stderr)


def _table(headers, rows) -> str:
    return table(headers, rows, align_right=False)


def cmd_ls(args) -> int:
    reg = _registry(args)
    if isinstance(reg, LocalRegistry) and not reg.root.is_dir():
        # a typo in the path must not look like a registry with nothing in it
        raise UserError(f"registry {reg.uri}: no such folder (nothing registered there yet; "
                        f"--registry URI or ${ENV_URI} names another)")
    headers, rows = reg.version_rows(args.name) if args.name else reg.model_rows()
    print(f"registry {reg.uri}")
    print(_table(headers, rows) if rows else "(empty)")
    _flag_problems(reg)
    return 0


def cmd_show(args) -> int:
    reg = _registry(args)
    m = reg.show(args.ref)
    if args.json:
        print(json.dumps(m, indent=2))
        _flag_problems(reg)
        return 0
    lineage = m.get("lineage") or {}
    print(_table(["field", "value"], [
        ["model", f"{m['name']}:{m['version']}"], ["aliases", ", ".join(m["aliases"]) or "-"],
        ["created", m["created"]], ["uri", m["uri"]],
        ["size", f"{_size(m.get('size') or sum(f['size'] for f in m['files']))} in {len(m['files'])} files"],
        ["content digest", m["content_digest"]],
        ["method", lineage.get("method") or "-"], ["teacher", lineage.get("teacher") or "-"],
        ["student", lineage.get("student") or "-"], ["pipeline run", lineage.get("pipeline_run_id") or "-"],
        ["gate", gate_text(lineage)]]))
    if m.get("metrics"):
        print()
        print(_table(["metric", "value"], [[k, v] for k, v in m["metrics"].items()]))
    if args.files:
        print()
        print(_table(["file", "size", "sha256"], [[f["path"], f["size"], f["sha256"]] for f in m["files"]]))
    _flag_problems(reg)
    return 0


def gate_text(lineage: dict) -> str:
    """``pass``, ``fail: …`` or, for a version registered with --force, ``forced: REASON (gate failed: …)``."""
    gate = lineage.get("gate")
    failed = "; ".join(gate.get("reasons", [])) if isinstance(gate, dict) else ""
    if lineage.get("forced"):
        return f"forced: {lineage['forced']}" + (f" (gate failed: {failed})" if failed else "")
    if not isinstance(gate, dict):
        return "-"
    return "pass" if gate.get("passed") else f"fail: {failed}"


def cmd_pull(args) -> int:
    reg = _registry(args)
    m = reg.pull(args.ref, args.dir)
    print(f"pulled {m['name']}:{m['version']} into {args.dir}: {len(m['files'])} files, all sha256 verified")
    return 0


def cmd_promote(args) -> int:
    reg = _registry(args)
    name = args.ref.split(":")[0].split("@")[0]
    event = reg.promote(args.ref, args.alias)
    if event.get("unchanged"):
        print(f"{name}@{event['alias']} → {event['version']} (already; nothing changed)")
    else:
        was = f" (was {event['previous']})" if event["previous"] else ""
        print(f"{name}@{event['alias']} → {event['version']}{was}")
    _flag_problems(reg)
    return 0


def cmd_lineage(args) -> int:
    reg = _registry(args)
    lineage = reg.lineage(args.ref)
    if args.json:
        print(json.dumps(lineage, indent=2))
        return 0
    metrics = lineage.pop("metrics", {})
    lineage.pop("config", None)  # the full resolved configuration: --json shows it
    if lineage.get("gate") is not None or lineage.get("forced"):
        lineage["gate"] = gate_text(lineage)
        lineage.pop("forced", None)
    rows = [[k, v if v is not None else "-"] for k, v in lineage.items()]
    rows += [[f"metric {k}", v] for k, v in metrics.items()]
    print(_table(["what", "value"], rows))
    _flag_problems(reg)
    return 0


def cmd_history(args) -> int:
    reg = _registry(args)
    events = reg.alias_history(args.name, args.alias)
    rows = [[e.get("time", "-"), e["alias"], e.get("previous") or "-", e["version"], e.get("by", "-")] for e in events]
    print(_table(["time", "alias", "from", "to", "by"], rows) if rows else "(no aliases)")
    _flag_problems(reg)
    return 0


def add_parser(sub) -> None:
    """Add ``registry`` and its subcommands to the top-level subparsers of ``llmneo``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, metavar="URI",
                        help="registry root: a folder or s3://bucket/prefix (default: $LLMNEO_REGISTRY, "
                             "else registry.uri of --preset)")
    common.add_argument("--preset", default="tiny", help="preset whose registry.uri is the default")
    group = sub.add_parser("registry", help="look up registered models (ls, show, pull, promote, lineage)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = group.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    p = cmds.add_parser("ls", parents=[common], help="list models, or the versions of NAME")
    p.add_argument("name", nargs="?", metavar="NAME", help="a model name: list its versions")
    p.set_defaults(fn=cmd_ls)
    p = cmds.add_parser("show", parents=[common], help="show NAME[:VERSION|@ALIAS]")
    p.add_argument("ref", metavar="NAME[:VERSION|@ALIAS]", help="a model: NAME (newest version), NAME:VERSION (e.g. demo:v3) or NAME@ALIAS")
    p.add_argument("--files", action="store_true", help="also list every file with its sha256")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(fn=cmd_show)
    p = cmds.add_parser("pull", parents=[common], help="download NAME[:VERSION|@ALIAS] into DIR, verified")
    p.add_argument("ref", metavar="NAME[:VERSION|@ALIAS]", help="a model: NAME (newest version), NAME:VERSION (e.g. demo:v3) or NAME@ALIAS")
    p.add_argument("dir", metavar="DIR", help="folder to download into (created)")
    p.set_defaults(fn=cmd_pull)
    p = cmds.add_parser("promote", parents=[common], help="point ALIAS at NAME:VERSION")
    p.add_argument("ref", metavar="NAME:VERSION", help="the version the alias should point at, e.g. demo:v3")
    p.add_argument("alias", metavar="ALIAS", help="the alias to move, e.g. production")
    p.set_defaults(fn=cmd_promote)
    p = cmds.add_parser("lineage", parents=[common], help="where NAME[:VERSION|@ALIAS] came from")
    p.add_argument("ref", metavar="NAME[:VERSION|@ALIAS]", help="a model: NAME (newest version), NAME:VERSION (e.g. demo:v3) or NAME@ALIAS")
    p.add_argument("--json", action="store_true", help="print as JSON (includes the full configuration)")
    p.set_defaults(fn=cmd_lineage)
    p = cmds.add_parser("history", parents=[common], help="alias moves of NAME (optionally one ALIAS)")
    p.add_argument("name", metavar="NAME", help="a model name")
    p.add_argument("alias", nargs="?", metavar="ALIAS", help="only the moves of this alias")
    p.set_defaults(fn=cmd_history)
