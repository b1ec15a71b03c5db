"""Run the whole DAG on this machine through ``kfp.local`` (SubprocessRunner, current interpreter).

    llmneo run --preset tiny [key=value ...]

kfp.local runs the same compiled components as a cluster (If and retries included; it ignores
kfp-kubernetes and resource settings, and its task cache is left off, so every step runs). Artifacts
land under ``--pipeline-root``; at the end a summary table names each step's time and key metrics,
and where the registered model is.
"""

import json
import os
import sys
import time
from pathlib import Path

from llmneo.cards import DatasetCard, DistillCard, EvalCard, ModelCard, ModelCards
from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.registry import MANIFEST
from llmneo.report import table
from llmneo.steps import STEPS as PIPELINE_STEPS
from llmneo.storage import open_store

STEPS = [(step.task, step.label) for step in PIPELINE_STEPS]  # (KFP task name, summary label)


def executor_outputs(run_dir: Path, task: str) -> tuple[dict, dict]:
    """(output parameters, {artifact name: (uri, metadata)}) of one finished task, or empty dicts."""
    path = run_dir / task / "executor_output.json"
    if not path.is_file():
        return {}, {}
    out = json.loads(path.read_text())
    artifacts = {name: (a["artifacts"][0]["uri"], a["artifacts"][0].get("metadata", {}))
                 for name, a in out.get("artifacts", {}).items() if a.get("artifacts")}
    return out.get("parameterValues", {}), artifacts


def _card(artifact: tuple[str, dict] | None, read):
    """The card in a task's output folder, or None when the step did not complete."""
    if not artifact:
        return None
    try:
        return read(artifact[0])
    except UserError:
        return None


def summarize(run_dir: Path, wall: float) -> tuple[str, dict]:
    """The end-of-run summary table (and the facts it shows) from the outputs of one run: each step's
    line comes from its card (:mod:`llmneo.cards`, the same metrics its component logged)."""
    outs = {task: executor_outputs(run_dir, task) for task, _ in STEPS}

    def artifact(task: str, name: str):
        return outs[task][1].get(name)

    teacher, student = (_card(artifact("load-teacher", role), ModelCard.read) for role in ("teacher", "student"))
    done = {
        "prep-data": _card(artifact("prep-data", "dataset"), DatasetCard.read),
        "load-teacher": ModelCards(teacher, student) if teacher and student else None,
        "distill": _card(artifact("distill", "adapter"), DistillCard.read),
        "merge-eval": _card(artifact("merge-eval", "model"), EvalCard.read),
    }
    registered = outs["register"][0].get("Output")
    model_uri = (artifact("merge-eval", "model") or (None, {}))[0]
    evaluation = {}
    if done["merge-eval"] and (Path(model_uri) / "eval.json").is_file():
        evaluation = json.loads((Path(model_uri) / "eval.json").read_text())
    register_seconds = outs["register"][1].get("metrics", ("", {}))[1].get("seconds", "-")
    rows = [[label, card.step_metrics()["seconds"], card.summary_line()] if card else
            [label, "-", "did not run"] for (task, label), card in zip(STEPS[:4], done.values(), strict=True)]
    rows.append([STEPS[4][1], register_seconds if registered else "-", registered or "skipped (gate failed)"])
    text = table(["step", "seconds", "result"], rows, align_right=False)
    text += f"\n\ntotal wall time {wall:.1f} s"
    if model_uri:
        text += f"\nreport:           {Path(model_uri) / 'report.md'}"
    run_id = registered_run_id(registered)
    text += f"\nrun folder:       {run_dir}"
    if run_id:
        text += f"\nrun id:           {run_id} (the registry lineage's pipeline_run_id)"
    if registered:
        text += f"\nregistered model: {registered.split('@', 1)[1]}"
    return text, {"registered": registered, "eval": evaluation, "model_dir": model_uri, "run_id": run_id}


def registered_run_id(registered: str | None) -> str | None:
    """The run id kfp.local gave the run, as the registered version's lineage records it (kfp.local
    names the run folder after the time, not after this id)."""
    if not registered or "@" not in registered:
        return None
    try:
        data = open_store(registered.split("@", 1)[1]).get_bytes(MANIFEST)
        return json.loads(data)["lineage"]["pipeline_run_id"] if data else None
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None


def run_local(preset: str, overrides: list[str], pipeline_root: str = "runs/kfp") -> int:
    from kfp import local

    from llmneo_pipelines import local_oneof
    from llmneo_pipelines.llm_neo import llm_neo

    local_oneof.install()

    cfg = load_config(preset, overrides)  # validate before anything runs
    overrides = list(overrides)
    registry = cfg.registry.uri  # the override, else $LLMNEO_REGISTRY, else the preset's
    # components run in their own processes (and read the preset again): pin the registry that this
    # command resolved, a local one to this directory
    is_local = "://" not in registry or registry.startswith("file://")
    overrides.append(f"registry.uri={Path(registry.removeprefix('file://')).resolve() if is_local else registry}")
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    before = {p.name for p in root.iterdir()}
    t0 = time.time()
    try:
        # distill_gpus="0": torchrun processes from the preset (no GPUs here); kfp.local ignores the rest
        llm_neo(preset=preset, overrides=overrides, max_kl_to_teacher=cfg.eval.max_kl_to_teacher,
                distill_gpus="0", eval_gpus="0", distill_nodes=cfg.distill.nnodes)
    except RuntimeError as e:
        print(f"error: pipeline failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    wall = time.time() - t0
    new = sorted((p for p in root.iterdir() if p.name not in before), key=lambda p: p.stat().st_mtime)
    if not new:
        print("error: kfp.local produced no run folder", file=sys.stderr)
        return 1
    text, _ = summarize(new[-1], wall)
    print("\n" + text)
    return 0
