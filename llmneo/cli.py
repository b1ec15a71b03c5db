"""``llmneo`` command line: one subcommand per pipeline step, plus ``run`` (the whole DAG locally).

    llmneo run --preset tiny distill.max_steps=8          # the DAG through kfp.local
    llmneo prep --preset tiny --out runs/dbg/dataset      # one step alone, on local folders
    llmneo config --preset smollm2-demo distill.alpha=0.9 # print the resolved configuration
    llmneo config --keys                                  # every key, type, default, description
    llmneo compare --preset smollm2-demo                  # untouched / SFT / LoRA / KD / NEO side by side
    llmneo registry ls [NAME]                             # registered models (see `llmneo registry -h`)

Every subcommand takes ``--preset`` and trailing ``key=value`` overrides. User mistakes print one
line ``error: …`` and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from llmneo.errors import UserError


def guarded(fn: Callable, *args, **kwargs):
    """Call ``fn``; on a :class:`UserError` print one line and exit 2 (used by CLI and components)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _config(args):
    from llmneo.config import load_config

    return load_config(args.preset, args.overrides)


def _print_card(card: dict) -> None:
    print(json.dumps(card, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------


def cmd_config(args) -> int:
    from llmneo.config import describe_fields, dump_yaml, preset_names
    from llmneo.report import table

    if args.keys:
        print(table(["key", "type", "default", "description"],
                    [[k, t, json.dumps(v), d] for k, t, v, d in describe_fields()], align_right=False))
        return 0
    if args.list:
        print("\n".join(preset_names()))
        return 0
    cfg = _config(args)
    print(dump_yaml(cfg), end="")
    print(f"# config hash {cfg.hash()}")
    return 0


def cmd_prep(args) -> int:
    from llmneo.steps import run_prep

    _print_card(run_prep(_config(args), args.out))
    return 0


def cmd_teacher(args) -> int:
    from llmneo.steps import run_teacher

    _print_card(run_teacher(_config(args), args.dataset, args.teacher_out, args.student_out))
    return 0


def cmd_distill(args) -> int:
    from llmneo.steps import run_distill

    _print_card(run_distill(_config(args), args.dataset, args.teacher, args.student, args.out))
    return 0


def cmd_merge_eval(args) -> int:
    from llmneo.report import comparison, gate_line, table
    from llmneo.steps import run_merge_eval

    result = run_merge_eval(_config(args), args.dataset, args.teacher, args.student, args.adapter, args.out)
    print(table(*comparison(result)))
    print(f"gate: {gate_line(result['gate'])}")
    print(f"model and reports: {args.out} (report.md, report.html, eval.json, README.md)")
    return 0


def cmd_register(args) -> int:
    from llmneo.steps import run_register

    manifest = run_register(_config(args), args.model, args.run_id)
    print(f"registered {manifest['name']}:{manifest['version']} at {manifest['uri']}")
    return 0


def cmd_compare(args) -> int:
    from llmneo.compare import parse_grid, print_summary, run_compare

    cfg = _config(args)
    out = args.out or Path("runs/compare") / cfg.name
    print_summary(run_compare(cfg, out, parse_grid(args.grid)), out)
    return 0


def cmd_run(args) -> int:
    # KFP lives outside the library: the local DAG runner is part of the pipelines package.
    local_run = importlib.import_module("llmneo_pipelines.local_run")
    return local_run.run_local(args.preset, args.overrides, pipeline_root=args.pipeline_root, runner=args.runner)


# Kubeflow Pipelines (upload, submit, GitOps schedules): KFP client code lives in llmneo_pipelines.
def _kfp_command(module: str, name: str) -> Callable:
    def run(args) -> int:
        return getattr(importlib.import_module(f"llmneo_pipelines.{module}"), name)(args)

    return run


def add_kubeflow_commands(sub) -> None:
    """``upload``, ``submit`` and ``schedule sync`` (see README "Run on Kubeflow")."""

    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default=None, help="Kubeflow Pipelines URL (default: $KFP_HOST)")
        p.add_argument("--namespace", default=None, help="KFP namespace / Kubeflow profile (default: $KFP_NAMESPACE)")

    p = sub.add_parser("upload", help="upload the compiled pipeline (a new version) to Kubeflow Pipelines",
                       description="upload pipelines/llm_neo.yaml as pipeline llm-neo, version --version")
    connection(p)
    p.add_argument("--version", default=None, help="version name (default: package version + content hash)")
    p.add_argument("--description", default=None, help="version description shown in the UI")
    p.add_argument("--package", default=None, help="compiled pipeline YAML (default: the packaged one)")
    p.set_defaults(fn=_kfp_command("kfp_client", "cmd_upload"))

    p = sub.add_parser("submit", help="create a Kubeflow Pipelines run and print its URL",
                       description="validate the configuration locally, then create a run with kfp.Client")
    connection(p)
    p.add_argument("--preset", default="tiny", help="preset name or YAML path (default: tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    p.add_argument("--pool-file", default=None, help="pipeline parameters of the GPU pool (k8s/overlays/*/pool.yaml)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a pipeline parameter, e.g. distill_nodes=2 (repeatable)")
    p.add_argument("--version", default=None, help="run an uploaded version (default: the local compiled package)")
    p.add_argument("--experiment", default="llmneo")
    p.add_argument("--run-name", default=None)
    p.add_argument("--service-account", default="llmneo-pipeline", help="runs' service account ('' = KFP default)")
    p.add_argument("--no-cache", action="store_true", help="disable KFP caching for this run")
    p.set_defaults(fn=_kfp_command("kfp_client", "cmd_submit"))

    p = sub.add_parser("schedule", help="GitOps: recurring runs declared in k8s/schedules/*.yaml")
    ssub = p.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    p = ssub.add_parser("sync", help="reconcile the schedule files into KFP recurring runs",
                        description="create, replace (create new, pause and delete old) and delete recurring runs")
    connection(p)
    p.add_argument("--dir", default="k8s/schedules", help="folder of schedule YAML files")
    p.add_argument("--pool-file", default=None, help="pipeline parameters of the GPU pool")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--experiment", default=None, help="KFP experiment (default: $KFP_EXPERIMENT or llmneo)")
    p.add_argument("--service-account", default=None, help="runs' service account (default: llmneo-pipeline)")
    p.set_defaults(fn=_kfp_command("schedules", "cmd_schedule_sync"))


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmneo", description="LLM-NEO distillation pipeline",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--preset", default="tiny", help="preset name or YAML path (default: tiny)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
        p.set_defaults(fn=fn)
        return p

    p = add("config", cmd_config, "print the resolved configuration")
    p.add_argument("--keys", action="store_true", help="list every configuration key")
    p.add_argument("--list", action="store_true", help="list presets")

    p = add("prep", cmd_prep, "step 1: prepare data into a dataset folder")
    p.add_argument("--out", required=True, type=Path, help="dataset output folder")

    p = add("teacher", cmd_teacher, "step 2: load/verify the teacher, materialize the base student")
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--teacher-out", required=True, type=Path)
    p.add_argument("--student-out", required=True, type=Path)

    p = add("distill", cmd_distill, "step 3: NEO distillation with torchrun")
    for name in ("dataset", "teacher", "student"):
        p.add_argument(f"--{name}", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="adapter/model output folder")

    p = add("merge-eval", cmd_merge_eval, "step 4: merge the adapter and evaluate against the teacher")
    for name in ("dataset", "teacher", "student", "adapter"):
        p.add_argument(f"--{name}", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="merged model output folder")

    p = add("register", cmd_register, "step 5: register the merged model")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--run-id", default=None)

    p = add("compare", cmd_compare, "the seed's comparison: untouched student, SFT, LoRA, KD, NEO on the "
            "same data, steps and seeds; a table and a plot")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/compare/<preset name>)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a key over values for every trained method (repeatable: cartesian product)")

    p = add("run", cmd_run, "run the whole DAG locally through kfp.local")
    p.add_argument("--pipeline-root", default="runs/kfp", help="where kfp.local keeps artifacts")
    p.add_argument("--runner", choices=["subprocess", "containers"], default="subprocess",
                   help="subprocess: this Python; containers: the project's images via Docker or podman "
                        "(data and registry in S3; see README 'Run in containers')")

    add_kubeflow_commands(sub)

    # ---- model registry lookups: `llmneo registry ls|show|pull|promote|lineage|history`
    from llmneo.registry.cli import add_parser as add_registry_parser

    add_registry_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(functools.partial(args.fn, args))


if __name__ == "__main__":
    sys.exit(main())
