"""Run the whole DAG on this machine through ``kfp.local`` (SubprocessRunner, current interpreter).

    llmneo run --preset tiny [key=value ...]

kfp.local runs the same compiled components as a cluster (If, retries and caching included; it
ignores kfp-kubernetes and resource settings). Artifacts land under ``--pipeline-root``; at the end a
summary table names each step's time and key metrics, and where the registered model is.
"""

import json
import os
import sys
import time
from pathlib import Path

from llmneo.config import load_config
from llmneo.report import table

STEPS = [("prep-data", "data prep"), ("load-teacher", "teacher loading"), ("distill", "NEO distill"),
         ("merge-eval", "merge and eval"), ("register", "register")]


def executor_outputs(run_dir: Path, task: str) -> tuple[dict, dict]:
    """(output parameters, {artifact name: (uri, metadata)}) of one finished task, or empty dicts."""
    path = run_dir / task / "executor_output.json"
    if not path.is_file():
        return {}, {}
    out = json.loads(path.read_text())
    artifacts = {name: (a["artifacts"][0]["uri"], a["artifacts"][0].get("metadata", {}))
                 for name, a in out.get("artifacts", {}).items() if a.get("artifacts")}
    return out.get("parameterValues", {}), artifacts


def summarize(run_dir: Path, wall: float) -> tuple[str, dict]:
    """The end-of-run summary table (and the facts it shows) from the executor outputs of one run."""
    outs = {task: executor_outputs(run_dir, task) for task, _ in STEPS}

    def metric(task: str, key: str, default=float("nan")):
        return outs[task][1].get("metrics", ("", {}))[1].get(key, default)

    registered = outs["register"][0].get("Output")
    model_uri = outs["merge-eval"][1].get("model", (None, {}))[0]
    evaluation = {}
    if model_uri and (Path(model_uri) / "eval.json").is_file():
        evaluation = json.loads((Path(model_uri) / "eval.json").read_text())
    fid, gate = evaluation.get("fidelity", {}), evaluation.get("gate", {})
    results = {
        "prep-data": f"{metric('prep-data', 'rows_train', '?'):.0f} train / {metric('prep-data', 'rows_val'):.0f} "
                     f"val rows, {metric('prep-data', 'rows_rejected'):.0f} rejected",
        "load-teacher": f"teacher {metric('load-teacher', 'teacher_parameters') / 1e6:.2f}M params, "
                        f"student {metric('load-teacher', 'student_parameters') / 1e6:.2f}M",
        "distill": f"final loss {metric('distill', 'final_loss'):.4f} (ce {metric('distill', 'final_ce'):.4f}, "
                   f"kd {metric('distill', 'final_kd'):.4f}), {metric('distill', 'tokens_per_s'):.0f} tok/s",
        "merge-eval": (f"KL to teacher {fid.get('base_student', {}).get('kl_to_teacher', float('nan')):.4f} "
                       f"(base) → {fid.get('distilled', {}).get('kl_to_teacher', float('nan')):.4f}; gate "
                       + ("pass" if gate.get("passed") else "FAIL: " + "; ".join(gate.get("reasons", []))))
        if evaluation else "did not run",
        "register": registered or "skipped (gate failed)",
    }
    rows = [[label, metric(task, "seconds", "-"), results[task]] for task, label in STEPS]
    text = table(["step", "seconds", "result"], rows, align_right=False)
    text += f"\n\ntotal wall time {wall:.1f} s"
    if model_uri:
        text += f"\nreport:           {Path(model_uri) / 'report.md'}"
    if registered:
        text += f"\nregistered model: {registered.split('@', 1)[1]}"
    return text, {"registered": registered, "eval": evaluation, "model_dir": model_uri}


def run_local(preset: str, overrides: list[str], pipeline_root: str = "runs/kfp", runner: str = "subprocess") -> int:
    from kfp import local

    from llmneo_pipelines import local_oneof
    from llmneo_pipelines.llm_neo import llm_neo

    local_oneof.install()

    cfg = load_config(preset, overrides)  # validate before anything runs
    overrides = list(overrides)
    registry = cfg.registry.uri
    if not registry.startswith("s3://") and not Path(registry).is_absolute():
        # components run in their own processes: pin the registry to this directory
        overrides.append(f"registry.uri={Path(registry).resolve()}")
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if runner == "containers":  # every step in the project's images; only the pipeline root is shared
        from llmneo_components.images import CPU_IMAGE, IMAGE
        from llmneo_pipelines import container_run

        container_run.check_config(cfg)
        container_run.ensure_engine()
        container_run.check_images([IMAGE, CPU_IMAGE])
        container_run.install(root)
        local.init(runner=local.DockerRunner(), pipeline_root=str(root), raise_on_error=True)
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    before = {p.name for p in root.iterdir()} | {".cache"}
    t0 = time.time()
    try:
        # distill_gpus=0: torchrun processes from the preset (no GPUs here); kfp.local ignores the rest
        llm_neo(preset=preset, overrides=overrides, max_kl_to_teacher=cfg.eval.max_kl_to_teacher,
                distill_gpus=0, distill_nodes=cfg.distill.nnodes)
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
