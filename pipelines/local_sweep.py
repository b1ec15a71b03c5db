"""Run the sweep DAG (pipelines/llm_neo_sweep.py) on this machine through ``kfp.local``.

    llmneo sweep --preset tiny --grid distill.alpha=0.5,0.9 --grid distill.lora_rank=16,64 [key=value ...]

The same compiled components as on a cluster (SubprocessRunner, current interpreter; kfp.local
caches nothing). At the end: the sweep table (the select step's
report.md), where the HTML report is, and the registered winner.
"""

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from llmneo.config import load_config
from llmneo.errors import UserError
from llmneo.preflight import preflight
from llmneo.sweep import DEFAULT_METRICS, parse_metric, plan_points
from llmneo_pipelines import local_console
from llmneo_pipelines.local_run import executor_outputs, pin_registry

SELECT, REGISTER = "select-sweep", "register"  # task names in the sweep DAG


def sweep_console() -> local_console.StepConsole:
    def label(task: str) -> str:
        return f"[sweep] {task:<14}"

    return local_console.StepConsole(sys.stdout, label)


@contextlib.contextmanager
def one_task_at_a_time():
    """kfp.local runs a ParallelFor's iterations in threads; the quiet console follows one task at a
    time (its log file), so the tasks are run one after the other (on a laptop they share the CPUs)."""
    from kfp.local import task_dispatcher

    original = task_dispatcher.run_single_task_implementation
    lock = threading.Lock()

    def run_task(*args, **kwargs):
        with lock:
            return original(*args, **kwargs)

    task_dispatcher.run_single_task_implementation = run_task
    try:
        yield
    finally:
        task_dispatcher.run_single_task_implementation = original


def summarize(run_dir: Path, wall: float) -> tuple[str, dict]:
    """The select step's table, the report's paths and the registered winner of one sweep run."""
    params, artifacts = executor_outputs(run_dir, SELECT)
    registered = executor_outputs(run_dir, REGISTER)[0].get("Output")
    report = artifacts.get("report", (None, {}))[0]
    shown = ("\n".join(line for line in Path(report).read_text().splitlines() if not line.startswith("![")).strip()
             if report and Path(report).is_file() else "the select step did not run")  # the plot: in the report
    lines = [shown,
             "", f"total wall time {wall:.1f} s"]
    if report:
        lines.append(f"report:           {report} (HTML: {artifacts.get('report_html', ('-',))[0]})")
    lines.append(f"run folder:       {run_dir}")
    lines.append(f"registered model: {registered.split('@', 1)[1]}" if registered
                 else "registered model: none (no point passed, or the winner failed the gate)")
    return "\n".join(lines), {"registered": registered, "gate": params.get("Output"),
                              "winner": artifacts.get("winner", (None,))[0], "report": report}


def run_sweep_local(preset: str, overrides: list[str], grid: list[str], metrics: list[str] | None = None,
                    pipeline_root: str = "runs/kfp", verbose: bool = False) -> int:
    from kfp import local

    from llmneo_pipelines.llm_neo_sweep import llm_neo_sweep

    cfg = load_config(preset, overrides)  # validate before anything runs: the configuration, every point, metrics
    preflight(cfg)
    points = plan_points(list(overrides), list(grid), lambda point: load_config(preset, point))
    metrics = list(metrics or DEFAULT_METRICS)
    for m in metrics:
        parse_metric(m)
    if cfg.distill.nnodes > 1:
        raise UserError("distill.nnodes: a sweep trains each point on one node; set distill.nnodes=1")
    print(f"sweep: {len(points)} points of {preset}, ranked by {', then '.join(metrics)}", flush=True)
    overrides = pin_registry(cfg, overrides)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    before = {p.name for p in root.iterdir()} | {".cache"}
    t0 = time.time()
    output = local_console.streamed() if verbose else local_console.routed(sweep_console())
    try:
        with output, one_task_at_a_time():
            llm_neo_sweep(preset=preset, overrides=overrides, grid=list(grid), metrics=metrics,
                          max_kl_to_teacher=cfg.eval.max_kl_to_teacher, gpus="0")
    except RuntimeError as e:
        print(f"error: pipeline failed: {str(e).splitlines()[0]}", file=sys.__stderr__)
        return 1
    new = sorted((p for p in root.iterdir() if p.name not in before), key=lambda p: p.stat().st_mtime)
    if not new:
        print("error: kfp.local produced no run folder", file=sys.stderr)
        return 1
    text, _ = summarize(new[-1], time.time() - t0)
    print("\n" + text)
    return 0
