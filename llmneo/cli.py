"""``llmneo`` command line: one subcommand per pipeline step, plus ``run`` (the whole DAG locally).

    llmneo run --preset tiny distill.max_steps=8          # the DAG through kfp.local
    llmneo prep --preset tiny --out runs/dbg/dataset      # one step alone, on local folders
    llmneo config --preset smollm2-demo distill.alpha=0.9 # print the resolved configuration
    llmneo config --keys                                  # every key, type, default, description
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


def cmd_run(args) -> int:
    # KFP lives outside the library: the local DAG runner is part of the pipelines package.
    local_run = importlib.import_module("llmneo_pipelines.local_run")
    return local_run.run_local(args.preset, args.overrides, pipeline_root=args.pipeline_root)


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

    p = add("run", cmd_run, "run the whole DAG locally through kfp.local")
    p.add_argument("--pipeline-root", default="runs/kfp", help="where kfp.local keeps artifacts")

    # ---- model registry lookups: `llmneo registry ls|show|pull|promote|lineage|history` (issue 5)
    from llmneo.registry.cli import add_parser as add_registry_parser

    add_registry_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(functools.partial(args.fn, args))


if __name__ == "__main__":
    sys.exit(main())
