"""The ``llmneo`` console script: the library's commands (:mod:`llmneo.cli`) plus the Kubeflow
Pipelines ones, which live here with the KFP code (installed as ``llmneo_pipelines.cli``).

    llmneo run --preset tiny distill.max_steps=8          # the whole DAG locally, through kfp.local
    llmneo upload --host URL [--version NAME]             # the compiled pipeline into Kubeflow Pipelines
    llmneo submit --host URL --preset NAME [key=value ...] # a Kubeflow Pipelines run; prints its URL
    llmneo schedule sync --dir k8s/schedules [--dry-run]  # GitOps recurring runs
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
import sys

from llmneo import cli as library_cli
from llmneo_pipelines import kfp_client, local_run, local_sweep, schedules


def cmd_run(args) -> int:
    return local_run.run_local(args.preset, args.overrides, pipeline_root=args.pipeline_root, runner=args.runner,
                               verbose=args.verbose)


def cmd_sweep(args) -> int:
    return local_sweep.run_sweep_local(args.preset, args.overrides, args.grid, args.metric,
                                       pipeline_root=args.pipeline_root, verbose=args.verbose)


def sweep_options(p: argparse.ArgumentParser, local: bool) -> None:
    """The grid and ranking options shared by ``llmneo sweep`` and ``llmneo submit --sweep``."""
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="swept setting (repeatable: every combination is a point), e.g. distill.alpha=0.5,0.9")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="ranking metric (repeatable: the next ones break ties; default kl_to_teacher, "
                        "top1_agreement, perplexity; min:NAME / max:NAME set the direction)")
    if not local:
        p.add_argument("--parallelism", type=int, default=None,
                       help="points trained at once (compiled into the sweep pipeline; default 4)")


def add_commands(sub) -> None:
    """``run`` (the DAG through kfp.local), ``upload``, ``submit`` and ``schedule sync`` (docs/pipeline.md)."""

    p = sub.add_parser("run", help="run the whole DAG locally through kfp.local",
                       description="run the whole DAG locally through kfp.local")
    p.add_argument("--preset", default="tiny", help=library_cli.PRESET_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    p.add_argument("--pipeline-root", default="runs/kfp", help="where kfp.local keeps artifacts")
    p.add_argument("--runner", choices=["subprocess", "containers"], default="subprocess",
                   help="subprocess: this Python; containers: the project's images via Docker or podman "
                        "(data and registry in S3; see docs/containers.md)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="stream every step's full output (default: a line per step; the output goes to "
                        "<run folder>/logs/<task>.log)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("sweep", help="a sweep locally through kfp.local: one teacher, every grid point, the best registered",
                       description="the sweep DAG (pipelines/llm_neo_sweep.py) through kfp.local")
    p.add_argument("--preset", default="tiny", help=library_cli.PRESET_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides shared by every point")
    sweep_options(p, local=True)
    p.add_argument("--pipeline-root", default="runs/kfp", help="where kfp.local keeps artifacts")
    p.add_argument("-v", "--verbose", action="store_true", help="stream every step's full output")
    p.set_defaults(fn=cmd_sweep)

    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default=None, help="Kubeflow Pipelines URL (default: $KFP_HOST)")
        p.add_argument("--namespace", default=None, help="KFP namespace / Kubeflow profile (default: $KFP_NAMESPACE)")

    def image_registry(p: argparse.ArgumentParser) -> None:
        p.add_argument("--image-registry", default=None, metavar="REGISTRY",
                       help="where your copies of the llmneo images are, e.g. ghcr.io/team (default: "
                            "$LLMNEO_IMAGE_REGISTRY); required while the pipeline names the default images")

    p = sub.add_parser("upload", help="upload the compiled pipeline (a new version) to Kubeflow Pipelines",
                       description="upload pipelines/llm_neo.yaml as pipeline llm-neo, version --version")
    connection(p)
    p.add_argument("--version", default=None, help="version name (default: package version + content hash)")
    p.add_argument("--description", default=None, help="version description shown in the UI")
    p.add_argument("--package", default=None, help="compiled pipeline YAML (default: the packaged one)")
    image_registry(p)
    p.add_argument("--sweep", action="store_true", help="upload the sweep pipeline (llm-neo-sweep) instead")
    p.set_defaults(fn=kfp_client.cmd_upload)

    p = sub.add_parser("submit", help="create a Kubeflow Pipelines run and print its URL",
                       description="validate the configuration locally, then create a run with kfp.Client")
    connection(p)
    p.add_argument("--preset", default="tiny", help=library_cli.PRESET_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    p.add_argument("--pool-file", default=None, help="pipeline parameters of the GPU pool (k8s/overlays/*/pool.yaml)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a pipeline parameter, e.g. distill_nodes=2 (repeatable)")
    p.add_argument("--version", default=None, help="run an uploaded version (default: the local compiled package)")
    p.add_argument("--experiment", default="llmneo", help="KFP experiment the run is filed under (default: llmneo)")
    p.add_argument("--run-name", default=None, help="run name shown in the UI (default: preset name and time)")
    p.add_argument("--service-account", default="llmneo-pipeline", help="runs' service account ('' = KFP default)")
    p.add_argument("--no-cache", action="store_true", help="disable KFP caching for this run")
    image_registry(p)
    p.add_argument("--sweep", action="store_true", help="run the sweep pipeline (llm-neo-sweep) over --grid")
    sweep_options(p, local=False)
    p.set_defaults(fn=kfp_client.cmd_submit)

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
    p.set_defaults(fn=schedules.cmd_schedule_sync)


def cmd_prune_checkpoints(args) -> int:
    from llmneo.launch import prune_checkpoints

    stale = prune_checkpoints(args.root, args.days, dry_run=args.dry_run)
    print(f"{len(stale)} run folder(s) {'would be ' if args.dry_run else ''}removed, "
          f"{sum(s.size_bytes for s in stale) / 2**30:.2f} GiB")
    return 0


def add_retention(sub) -> None:
    p = sub.add_parser("prune-checkpoints", help="remove checkpoints of runs that failed for good",
                       description="remove run folders under --root in which nothing was written for --days days "
                                   "(the distill step does this itself with 14 days)")
    p.add_argument("--root", default="/cache/checkpoints", help="checkpoint root (default: /cache/checkpoints)")
    p.add_argument("--days", type=float, default=14.0, help="age in days of the newest file (default: 14)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.set_defaults(fn=cmd_prune_checkpoints)


EXAMPLES = """examples:
  llmneo run --preset tiny distill.max_steps=8           the whole pipeline on this machine
  llmneo upload --host URL [--version NAME]              the compiled pipeline into Kubeflow Pipelines
  llmneo submit --host URL --preset NAME [key=value ...] a Kubeflow Pipelines run; prints its URL
  llmneo sweep --preset tiny --grid distill.alpha=0.5,0.9 a sweep through kfp.local (submit --sweep: on Kubeflow)
  llmneo schedule sync --dir k8s/schedules [--dry-run]   recurring runs declared in YAML files
""" + library_cli.EXAMPLES.removeprefix("examples:\n")


def build_parser() -> argparse.ArgumentParser:
    return library_cli.build_parser([add_commands, add_retention], epilog=EXAMPLES)


def main(argv: list[str] | None = None) -> int:
    return library_cli.main(argv, [add_commands, add_retention], epilog=EXAMPLES)


if __name__ == "__main__":
    sys.exit(main())
