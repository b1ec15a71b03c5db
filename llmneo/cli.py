"""``llmneo`` command line, the library's part: one subcommand per pipeline step (on local folders).

    llmneo prep --preset tiny --out runs/dbg/dataset      # one step alone, on local folders
    llmneo config --preset smollm2-demo distill.alpha=0.9 # print the resolved configuration
    llmneo config --keys                                  # every key, type, default, description
    llmneo compare --preset smollm2-demo                  # untouched / SFT / LoRA / KD / NEO side by side
    llmneo registry ls [NAME]                             # registered models (see `llmneo registry -h`)

The step subcommands come from :data:`llmneo.steps.STEPS`. The ``llmneo`` console script is
``pipelines/cli.py``: this parser plus the Kubeflow Pipelines commands (``run``, ``upload``,
``submit``, ``schedule``) added through ``extensions``, so that this module — like all of the
library — imports nothing of KFP.

Every subcommand takes ``--preset`` and trailing ``key=value`` overrides. User mistakes print one
line ``error: …`` and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmneo import __version__
from llmneo.compare import parse_grid, run_compare
from llmneo.compare_report import print_summary
from llmneo.config import describe_fields, dump_yaml, load_config, preset_names
from llmneo.errors import UserError, guarded, quiet_broken_pipe
from llmneo.registry.cli import add_parser as add_registry_parser
from llmneo.report import comparison, gate_line, table
from llmneo.steps import STEPS

EXAMPLES = """examples:
  llmneo prep --preset tiny --out runs/dbg/dataset       one step alone, on local folders
  llmneo config --preset smollm2-demo distill.alpha=0.9  print the resolved configuration
  llmneo config --keys                                   every key, type, default, description
  llmneo compare --preset smollm2-demo                   untouched / SFT / LoRA / KD / NEO side by side
  llmneo registry ls [NAME]                              registered models (llmneo registry -h)

Every command takes --preset (a shipped name or a YAML file) and trailing key=value overrides.
A mistake prints one line "error: ..." and exits with code 2."""


def _config(args):
    return load_config(args.preset, args.overrides)


def _print_card(card) -> None:
    """A step's card (or the teacher step's pair of cards) as JSON."""
    print(json.dumps(card.to_dict() if hasattr(card, "to_dict") else card, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------


def cmd_config(args) -> int:
    if args.keys:
        # wrapped to $COLUMNS or the terminal's width; piped into grep/less: one line per key
        width = shutil.get_terminal_size((0, 0)).columns
        print(table(["key", "type", "default", "description"],
                    [[k, t, json.dumps(v), d] for k, t, v, d in describe_fields()], align_right=False,
                    max_width=width or None))
        return 0
    if args.list:
        print("\n".join(preset_names()))
        return 0
    cfg = _config(args)
    print(dump_yaml(cfg), end="")
    print(f"# config hash {cfg.hash()}")
    return 0


def _print_summary(card, args) -> None:
    """A step's card in one line (``--json``: all of it), and where its output is."""
    folder = getattr(args, "out", None) or getattr(args, "teacher_out", None)
    print(card.summary_line())
    if folder:
        print(f"output: {folder}" + (f" and {args.student_out}" if getattr(args, "student_out", None) else ""))


def _print_merge_eval(result: dict, args) -> None:
    print(table(*comparison(result)))
    print(f"gate: {gate_line(result['gate'])}")
    print(f"model and reports: {args.out} (report.md, report.html, eval.json, README.md)")


def _print_registered(manifest: dict, _args) -> None:
    print(f"registered {manifest['name']}:{manifest['version']} at {manifest['uri']}")


# How a step's result is shown (``--json``: the whole card or result as JSON instead).
PRINTERS: dict[str, Callable[[Any, argparse.Namespace], None]] = {
    "generate": _print_summary, "prep": _print_summary, "teacher": _print_summary, "distill": _print_summary,
    "merge-eval": _print_merge_eval, "register": _print_registered}


PRESET_HELP = "a shipped preset name (llmneo config --list) or a YAML file (default: tiny)"


def _dest(option: str) -> str:
    return option.replace("-", "_")


def cmd_step(args) -> int:
    """``llmneo <step>``: the step's function on the folders given as options (see :data:`STEPS`)."""
    step = args.step
    for option in step.outputs:
        _check_out(getattr(args, _dest(option)), f"--{option}")
    folders = [getattr(args, _dest(o)) for o in (*step.inputs, *step.outputs)]
    extra = ({"run_id": args.run_id, "force": args.force, "aliases": args.alias} if step.name == "register"
             else {"overwrite": args.overwrite} if step.name == "distill"
             else {"answers_dir": args.answers} if step.name == "prep" else {})
    result = step.function(_config(args), *folders, **extra)
    if args.json:
        _print_card(result)
    else:
        PRINTERS.get(step.name, lambda card, _args: _print_card(card))(result, args)
    return 0


def _check_out(path: Path, option: str) -> None:
    """An output folder option names a folder (or nothing yet), not a file: said before any work."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{option} {path}: {parent} is a file, not a folder")


def cmd_compare(args) -> int:
    cfg = _config(args)
    out = args.out or Path("runs/compare") / cfg.name
    _check_out(out, "--out")
    print_summary(run_compare(cfg, out, parse_grid(args.grid)), out)
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser(extensions: Sequence[Callable[[Any], None]] = (), epilog: str | None = None
                 ) -> argparse.ArgumentParser:
    """The library's commands; each of ``extensions`` is called with the subparsers to add its own."""
    parser = argparse.ArgumentParser(prog="llmneo", description="LLM-NEO distillation pipeline",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=epilog or EXAMPLES)
    parser.add_argument("--version", action="version", version=f"llmneo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--preset", default="tiny", help=PRESET_HELP)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
        p.set_defaults(fn=fn)
        return p

    p = add("config", cmd_config, "print the resolved configuration")
    p.add_argument("--keys", action="store_true", help="list every configuration key")
    p.add_argument("--list", action="store_true", help="list presets")

    for number, step in enumerate(STEPS, 1):
        p = add(step.name, cmd_step, f"step {number}: {step.description}")
        for option, what in {**step.inputs, **step.outputs}.items():
            p.add_argument(f"--{option}", required=True, type=Path, help=what)
        p.add_argument("--json", action="store_true", help="print the step's whole card (result) as JSON")
        if step.name == "register":
            p.add_argument("--run-id", default=None, help="pipeline run id recorded in the lineage")
            p.add_argument("--force", default=None, metavar="REASON",
                           help="register even though the gate failed; REASON is recorded in the lineage. "
                                "A forced version moves no alias (not even registry.aliases) but --alias")
            p.add_argument("--alias", action="append", default=[], metavar="ALIAS",
                           help="also point ALIAS at the registered version (repeatable; e.g. --alias latest)")
        if step.name == "prep":
            p.add_argument("--answers", type=Path, default=None,
                           help="with data.answers=missing|teacher: the folder `llmneo generate` wrote")
        if step.name == "distill":
            p.add_argument("--overwrite", action="store_true",
                           help="replace a completed run of another configuration in --out")
        p.set_defaults(step=step)

    p = add("compare", cmd_compare, "untouched student, SFT, LoRA, KD and NEO on the same data, steps and "
            "seeds; a table and a plot")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/compare/<preset name>)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a key over values for every trained method (repeatable: cartesian product)")

    for extend in extensions:  # e.g. the Kubeflow Pipelines commands (pipelines/cli.py)
        extend(sub)

    add_registry_parser(sub)  # model registry lookups: `llmneo registry ls|show|pull|promote|lineage|history`
    return parser


def main(argv: list[str] | None = None, extensions: Sequence[Callable[[Any], None]] = (),
         epilog: str | None = None) -> int:
    args = build_parser(extensions, epilog).parse_args(argv)
    return quiet_broken_pipe(guarded, functools.partial(args.fn, args))


if __name__ == "__main__":
    sys.exit(main())
