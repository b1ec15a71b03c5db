"""The five pipeline steps, as plain functions on local folders, and :data:`STEPS`, their table.

The CLI (``llmneo prep|teacher|distill|merge-eval|register``) and the KFP components
(``components/*.py``) call exactly these functions: one piece of code per step, local run = cluster
run. Every step function takes the validated :class:`~llmneo.config.Config`, then its input folders,
then its output folders, in the order :data:`STEPS` lists them, and returns the step's card (a dict).

Adding a step: write its function here and add a :class:`Step` row (the CLI subcommand and the
local run's summary follow from the row), then a component in ``components/`` and its wiring in
``pipelines/llm_neo.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmneo.config import Config, dump_yaml
from llmneo.errors import UserError
from llmneo.models import read_card, write_card

# The step bodies live in modules that import torch/transformers; they are imported inside each
# function so that `import llmneo.steps` (the CLI, the light CPU image's register step) stays light.


def prepare_dataset(cfg: Config, dataset_out: str | Path) -> dict:
    """Step 1: data prep (tokenized with the student's tokenizer)."""
    from llmneo.data import run_prep
    from llmneo.teacher import student_tokenizer

    return run_prep(cfg, student_tokenizer(cfg), dataset_out)


def load_teacher(cfg: Config, dataset_dir: str | Path, teacher_out: str | Path, student_out: str | Path) -> dict:
    """Step 2: load and verify the teacher; materialize the base student; check tokenizers vs data;
    with ``teacher.mode=offline``, cache the teacher's top-k log-probabilities (``teacher_out/topk``)."""
    from llmneo.teacher import run_teacher

    return run_teacher(cfg, dataset_dir, teacher_out, student_out)


def torchrun_command(cfg: Config, workdir: Path) -> list[str]:
    d = cfg.distill
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nnodes={d.nnodes}",
            f"--nproc-per-node={d.nproc_per_node}", "-m", "llmneo.trainer", "--workdir", str(workdir)]


def _run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run ``cmd`` and wait for it. A SIGTERM received here (Kubernetes preempting the pod) is passed
    on to it — torchrun passes it to the trainers, which checkpoint and stop — instead of killing us
    and orphaning it. Ctrl-C already reaches the child through the terminal's process group, so
    SIGINT is only kept from interrupting the wait."""
    import signal
    import threading

    proc = subprocess.Popen(cmd, env=env)
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()

    def forward(signum, _frame):
        if proc.poll() is None and signum == signal.SIGTERM:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def distill_student(cfg: Config, dataset_dir: str | Path, teacher_dir: str | Path, student_dir: str | Path,
                out_dir: str | Path) -> dict:
    """Step 3: NEO distillation under torchrun (gloo on CPU, nccl on GPU).

    Re-running with the same ``out_dir`` (a KFP retry, a preempted pod) resumes from the checkpoint in
    ``out_dir/checkpoint``; a run already complete for the same configuration returns at once."""
    if cfg.distill.nnodes > 1:  # several nodes: a Kubeflow Trainer TrainJob runs the same entry point
        from llmneo.cluster import run_distill_multinode

        return run_distill_multinode(cfg, dataset_dir, teacher_dir, student_dir, out_dir)
    from llmneo.checkpointing import latest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    (out / "inputs.json").write_text(json.dumps(
        {"dataset": str(Path(dataset_dir).resolve()), "teacher": str(Path(teacher_dir).resolve()),
         "student": str(Path(student_dir).resolve())}, indent=2))
    cmd = torchrun_command(cfg, out)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.distill.nproc_per_node)))
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    returncode = _run_forwarding_signals(cmd, env)
    if returncode != 0:
        checkpoint = latest(out / "checkpoint")
        hint = (f"; checkpoint {checkpoint} kept: re-running the step resumes from it" if checkpoint
                else " (see the log above)")
        raise UserError(f"distill: torchrun exited with code {returncode}{hint}")
    card = read_card(out)
    card["wall_seconds"] = round(time.time() - t0, 2)
    return write_card(out, card)


def merge_and_evaluate(cfg: Config, dataset_dir: str | Path, teacher_dir: str | Path, student_dir: str | Path,
                       distill_dir: str | Path, model_out: str | Path) -> dict:
    """Step 4: merge the adapter, evaluate against the teacher, write the report and gate."""
    from llmneo.evaluate import run_merge_eval

    return run_merge_eval(cfg, dataset_dir, teacher_dir, student_dir, distill_dir, model_out)


def register_model(cfg: Config, model_dir: str | Path, run_id: str | None = None) -> dict:
    """Step 5: upload the merged model into the registry (manifest with sha256/size of every file and
    the lineage, written last), point ``registry.aliases`` at it, mirror it into a Kubeflow Model
    Registry when ``registry.kubeflow_url`` is set. Returns the manifest."""
    from llmneo.registry import git_commit, open_registry
    from llmneo.registry.kubeflow import mirror

    model_dir = Path(model_dir)
    if not (model_dir / "eval.json").is_file():
        raise UserError(f"{model_dir}: no eval.json; register takes the output folder of merge-eval")
    result = json.loads((model_dir / "eval.json").read_text())
    lineage = {"pipeline_run_id": run_id, "git_commit": git_commit(), "config_hash": cfg.hash(),
               "dataset_hash": result.get("dataset_hash"), "teacher": result.get("teacher"),
               "student": result.get("student"), "method": result.get("method"), "preset": cfg.name,
               "eval_config_hash": result.get("config_hash"), "gate": result.get("gate"),
               "config": yaml.safe_load(dump_yaml(cfg))}
    registry = open_registry(cfg.registry)
    manifest = registry.register(cfg.registry.name, model_dir, lineage, result["metrics"], cfg.registry.aliases)
    kubeflow = mirror(cfg.registry, manifest)
    return {**manifest, **({"kubeflow_model_registry": kubeflow} if kubeflow else {})}


# --------------------------------------------------------------------------------------------
# The table of steps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One pipeline step: ``function(cfg, *inputs, *outputs)`` with the folders in the order listed."""

    name: str  # the CLI subcommand: `llmneo <name>`; its folder options are --<input> / --<output>
    task: str  # the task's name in the KFP DAG (pipelines/llm_neo.py)
    label: str  # a short human name (the local run's summary table)
    function: Callable[..., dict]
    inputs: dict[str, str]  # folders read: option name -> what the folder holds
    outputs: dict[str, str]  # folders written: option name -> what the folder holds
    description: str


STEPS: tuple[Step, ...] = (
    Step("prep", "prep-data", "data prep", prepare_dataset, {},
         {"out": "dataset output folder"},
         "prepare data into a dataset folder"),
    Step("teacher", "load-teacher", "teacher loading", load_teacher,
         {"dataset": "the prepared dataset"},
         {"teacher-out": "teacher model folder", "student-out": "base student model folder"},
         "load/verify the teacher, materialize the base student"),
    Step("distill", "distill", "NEO distill", distill_student,
         {"dataset": "the prepared dataset", "teacher": "teacher model folder",
          "student": "base student model folder"},
         {"out": "adapter/model output folder"},
         "NEO distillation with torchrun"),
    Step("merge-eval", "merge-eval", "merge and eval", merge_and_evaluate,
         {"dataset": "the prepared dataset", "teacher": "teacher model folder",
          "student": "base student model folder", "adapter": "distill output folder"},
         {"out": "merged model output folder"},
         "merge the adapter and evaluate against the teacher"),
    Step("register", "register", "register", register_model,
         {"model": "merged model folder from merge-eval"}, {},
         "register the merged model"),
)
