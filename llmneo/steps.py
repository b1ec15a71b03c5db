"""The six pipeline steps, as plain functions on local folders, and :data:`STEPS`, their table.

The CLI (``llmneo prep|teacher|distill|merge-eval|register``) and the KFP components
(``components/*.py``) call exactly these functions: one piece of code per step, local run = cluster
run. Every step function takes the validated :class:`~llmneo.config.Config`, then its input folders,
then its output folders, in the order :data:`STEPS` lists them, and returns the step's typed card
(:mod:`llmneo.cards`).

Adding a step: write its function here and add a :class:`Step` row (the CLI subcommand and the
local run's summary follow from the row), then a component in ``components/`` and its wiring in
``pipelines/llm_neo.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmneo import cards
from llmneo.cards import AnswersCard, DatasetCard, DistillCard, EvalCard, ModelCards
from llmneo.config import Config, dump_yaml
from llmneo.errors import UserError, environment_faults
from llmneo.launch import (
    TRAINER_ERROR_ENV,
    TRAINER_ERROR_FILE,
    TrainerInputs,
    checkpoint_root,
    launch_env,
    output_lock,
    run_forwarding_signals,
    torchrun_command,
    write_workdir,
)

# The step bodies live in modules that import torch/transformers; they are imported inside each
# function so that `import llmneo.steps` (the CLI, the light CPU image's register step) stays light.


def generate_answers(cfg: Config, answers_out: str | Path) -> AnswersCard:
    """Step 1: with ``data.answers=missing|teacher`` the teacher writes the answers (reused or resumed
    from ``$LLMNEO_CACHE/generated``); with ``given``, only a card saying so."""
    from llmneo.generate import run_generate

    with environment_faults(answers_out):
        return run_generate(cfg, answers_out)


def prepare_dataset(cfg: Config, dataset_out: str | Path, answers_dir: str | Path | None = None) -> DatasetCard:
    """Step 2: data prep (tokenized with the student's tokenizer), of the teacher's answers
    (``answers_dir``, the generate step's folder) when ``data.answers`` is not ``given``."""
    from llmneo.data import run_prep
    from llmneo.teacher import student_tokenizer

    if cfg.data.answers != "given":
        if answers_dir is None:
            raise UserError(f"data.answers={cfg.data.answers}: prep reads the teacher's answers: run `llmneo "
                            f"generate --out DIR` with the same configuration, then `llmneo prep --answers DIR`")
        card = AnswersCard.read(answers_dir)
        if card.answers != cfg.data.answers or card.source != cfg.data.source:
            raise UserError(f"{answers_dir}: answers of data.source={card.source} with data.answers={card.answers}, "
                            f"not of this configuration: run `llmneo generate` again")
    with environment_faults(dataset_out):
        return run_prep(cfg, student_tokenizer(cfg), dataset_out, answers_dir)


def load_teacher(cfg: Config, dataset_dir: str | Path, teacher_out: str | Path,
                 student_out: str | Path) -> ModelCards:
    """Step 3: load and verify the teacher; materialize the base student; check tokenizers vs data;
    with ``teacher.mode=offline``, cache the teacher's top-k log-probabilities (``teacher_out/topk``)."""
    from llmneo.teacher import run_teacher

    with environment_faults(teacher_out):
        return run_teacher(cfg, dataset_dir, teacher_out, student_out)


def distill_student(cfg: Config, dataset_dir: str | Path, teacher_dir: str | Path, student_dir: str | Path,
                    out_dir: str | Path, task_config: dict | None = None, overwrite: bool = False) -> DistillCard:
    """Step 4: NEO distillation under torchrun (gloo on CPU, nccl on GPU).

    Re-running with the same ``out_dir`` (a KFP retry, a preempted pod) resumes from the newest valid
    checkpoint (``out_dir/checkpoint``, or ``distill.checkpoint_uri``); a run already complete for the same configuration returns
    at once; a completed run of another configuration is replaced only with ``overwrite``. One run
    at a time per ``out_dir`` (a lock; a second one refuses with the first one's pid).
    ``task_config`` (the KFP task's resources, tolerations, ... as a dict) only matters on several
    nodes, where it is forwarded to the TrainJob's nodes."""
    with output_lock(out_dir) as lock:
        _refuse_replacing(cfg, dataset_dir, Path(out_dir), overwrite)
        if cfg.distill.nnodes > 1:  # several nodes: a Kubeflow Trainer TrainJob runs the same entry point
            from llmneo.cluster import run_distill_multinode

            return run_distill_multinode(cfg, dataset_dir, teacher_dir, student_dir, out_dir, task_config)
        return _distill_local(cfg, dataset_dir, teacher_dir, student_dir, out_dir, lock)


def _refuse_replacing(cfg: Config, dataset_dir: str | Path, out: Path, overwrite: bool) -> None:
    """A completed run of another configuration in ``out`` is kept unless ``overwrite``."""
    from llmneo.trainer import training_hash

    if not cards.exists(out):
        return
    try:
        card = DistillCard.read(out)
    except UserError:
        return  # a garbled card is a stale one
    if card.status != "complete":
        return
    ours = training_hash(cfg, DatasetCard.read(dataset_dir).dataset_hash)
    if card.config_hash == ours or overwrite:
        return
    raise UserError(f"{out}: holds a completed distill run of another configuration (config hash "
                    f"{card.config_hash}, now {ours}); not replaced: pass --overwrite to replace it, or use "
                    f"another output folder")


def _distill_local(cfg: Config, dataset_dir, teacher_dir, student_dir, out_dir, lock: int) -> DistillCard:
    from llmneo.checkpointing import select

    out = write_workdir(out_dir, cfg, TrainerInputs.of(dataset_dir, teacher_dir, student_dir))
    if cfg.distill.resume:  # none of the checkpoints verifies: one line now, not one traceback per rank
        select(checkpoint_root(cfg, out), warn=False)
    cmd = torchrun_command(cfg, out)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    error_file = out / TRAINER_ERROR_FILE
    error_file.unlink(missing_ok=True)
    env = launch_env(cfg, step_label=step_label("distill"))
    env[TRAINER_ERROR_ENV] = str(error_file)
    returncode = run_forwarding_signals(cmd, env, hold=lock)
    if returncode == 2 and error_file.is_file():  # the trainer's one line, said once (not twice)
        raise UserError(error_file.read_text().strip())
    if returncode != 0:
        raise UserError(f"distill: torchrun exited with code {returncode}{_failure_hint(cfg, out, returncode)}")
    card = DistillCard.read(out)
    card.wall_seconds = round(time.time() - t0, 2)
    return card.write(out)


def _failure_hint(cfg: Config, out: Path, returncode: int) -> str:
    """What a re-run would do. 2: the trainer stopped on an error it named above (non-finite loss, a
    full disk, a bad input): a re-run stops the same way until that is fixed. A signal or a crash:
    a re-run resumes from the newest checkpoint, if there is one."""
    if returncode == 2:
        return " (the trainer's error above; re-running stops the same way until it is fixed)"
    from llmneo.checkpointing import latest

    checkpoint = latest(checkpoint_root(cfg, out))
    return (f"; checkpoint {checkpoint} kept: re-running the step resumes from it" if checkpoint
            else " (see the log above)")


def merge_and_evaluate(cfg: Config, dataset_dir: str | Path, teacher_dir: str | Path, student_dir: str | Path,
                       distill_dir: str | Path, model_out: str | Path) -> dict:
    """Step 5: merge the adapter, evaluate against the teacher, write the report and gate."""
    from llmneo.evaluate import run_merge_eval

    with environment_faults(model_out):
        return run_merge_eval(cfg, dataset_dir, teacher_dir, student_dir, distill_dir, model_out)


def register_model(cfg: Config, model_dir: str | Path, run_id: str | None = None, force: str | None = None,
                   aliases: list[str] | tuple[str, ...] = ()) -> dict:
    """Step 6: upload the merged model into the registry (manifest with sha256/size of every file and
    the lineage, written last), point ``registry.aliases`` at it, mirror it into a Kubeflow Model
    Registry when ``registry.kubeflow_url`` is set. Returns the manifest.

    Only a completed merge-eval (its :class:`EvalCard`) whose gate passed is registered, and only
    with the weights it evaluated (their SHA-256 are in the card); ``force`` (a reason, recorded in the
    lineage as ``forced``) registers a failed-gate model, which then moves only the ``aliases`` asked
    for here, not ``registry.aliases``. ``aliases`` are moved in addition to ``registry.aliases``."""
    from llmneo.registry import git_commit, open_registry
    from llmneo.registry.kubeflow import mirror
    from llmneo.sweep import winner_lineage

    model_dir = Path(model_dir)
    card = EvalCard.read(model_dir)
    if force is not None and not force.strip():
        raise UserError("register --force: give the reason (it is recorded in the lineage)")
    card.check_weights(model_dir)
    if not card.passed and force is None:
        reasons = "; ".join(card.gate.get("reasons", [])) or "no reason recorded"
        raise UserError(f"{model_dir}: the gate failed ({reasons}); not registered "
                        f"(--force REASON registers it anyway, with the reason in the lineage)")
    lineage = {"pipeline_run_id": run_id, "git_commit": git_commit(), "config_hash": cfg.hash(),
               "dataset_hash": card.dataset_hash, "teacher": card.teacher,
               "student": card.student, "method": card.method, "preset": cfg.name,
               "eval_config_hash": card.config_hash, "gate": card.gate,
               "config": yaml.safe_load(dump_yaml(cfg))}
    if force is not None:
        lineage["forced"] = force.strip()
    sweep = winner_lineage(model_dir)  # a sweep's winner: every point's overrides and metrics
    if sweep is not None:
        lineage["sweep"] = sweep
    registry = open_registry(cfg.registry)
    with environment_faults(cfg.registry.uri):
        move = list(aliases) if force is not None else [*cfg.registry.aliases, *aliases]
        manifest = registry.register(cfg.registry.name, model_dir, lineage, card.metrics, list(dict.fromkeys(move)))
    kubeflow = mirror(cfg.registry, manifest)
    return {**manifest, **({"kubeflow_model_registry": kubeflow} if kubeflow else {})}


def step_label(name: str) -> str:
    """``3/5 distill``: a step's place in the pipeline, as progress output shows it."""
    (number,) = [i for i, step in enumerate(STEPS, 1) if step.name == name]
    return f"{number}/{len(STEPS)} {name}"


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
    Step("generate", "generate-answers", "teacher answers", generate_answers, {},
         {"out": "answers output folder"},
         "with data.answers=missing|teacher: the teacher writes the answers"),
    Step("prep", "prep-data", "data prep", prepare_dataset, {},
         {"out": "dataset output folder"},
         "prepare data into a dataset folder (--answers: the generate step's folder)"),
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
