"""The distill trainer: sft | lora | kd | neo in one loop, launched by torchrun.

    # one process (CPU)
    python -m llmneo.trainer --workdir runs/x/distill
    # two processes, gloo on CPU (what `llmneo distill` and the KFP component run)
    torchrun --standalone --nproc-per-node 2 -m llmneo.trainer --workdir runs/x/distill

The workdir holds ``config.yaml`` and ``inputs.json`` (dataset/teacher/student folders), written by
:func:`llmneo.launch.write_workdir`; the entry point reads them with :meth:`DistillTrainer.from_workdir`
(in process: ``DistillTrainer(cfg, inputs, workdir)``); outputs go next to them: ``adapter/`` (lora, neo) or ``model/``
(sft, kd), ``train_log.jsonl``, ``tensorboard/``, ``loss_curve.png``, ``card.json`` (written last:
the run is complete), and while training ``checkpoint/`` (see :mod:`llmneo.checkpointing`).

Methods: sft = full-parameter CE; lora = LoRA branch, CE; kd = full-parameter student with the
teacher; neo = LoRA branch with the teacher, base frozen. Loss (1-α)·CE + α·T²·D(teacher‖student)
(:mod:`llmneo.losses`), teacher online (frozen, no_grad, bf16 on GPU) or offline (cached top-k,
``teacher.mode=offline``: no teacher is loaded).

Batching: a global batch of ``distill.global_batch_size`` sequences per optimizer step, whatever the
world size: each rank takes its contiguous share, in micro-batches, and the loss is divided by the
number of target tokens in the whole global batch, so 1 process and N processes compute the same
gradient (up to float summation order). The data order is a pure function of (seed, step), so the
data position of a checkpoint is just its step.

Training length: ``distill.max_steps`` optimizer steps, or ``distill.epochs`` passes over the train
split rounded up to whole steps (:meth:`llmneo.config.DistillConfig.total_steps`); rank 0 prints what
the run amounts to at start. ``distill.eval_every``: the training loss on the val split every N steps
and after the last (:meth:`DistillTrainer.validation_loss`, all ranks), logged as ``val_loss``.

Progress: one tqdm bar on rank 0, described ``[3/5 distill] neo`` when the step launcher sets
``LLMNEO_STEP_LABEL`` (:func:`llmneo.launch.launch_env`), with the terms that exist, lr and tokens/s
(:func:`progress_postfix`).

Preemption: SIGTERM/SIGINT set a flag; at the end of the current optimizer step all ranks agree,
save a checkpoint and exit with 128+signal. Re-running the same command resumes exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llmneo import cards
from llmneo.cards import DatasetCard, DistillCard
from llmneo.config import FINGERPRINT_SECTIONS, Config
from llmneo.errors import UserError, environment_error
from llmneo.launch import (
    STEP_LABEL_ENV,
    TrainerInputs,
    checkpoint_root,
    die_with_parent,
    read_workdir,
    report_error,
)
from llmneo.lora import save_adapter
from llmneo.train_checkpoint import CheckpointMixin
from llmneo.train_eval import EvalMixin
from llmneo.train_setup import KD_METHODS, LORA_METHODS, SetupMixin
from llmneo.train_step import (  # noqa: F401 (re-exported: the trainer's public names)
    DistillModule,
    NonFiniteTraining,
    StepMixin,
    count_targets,
    device_batch,
    lr_lambda,
    peak_memory_mb,
    peak_rss_mb,
)


class Preempted(Exception):
    """Raised on every rank after the checkpoint of a SIGTERM/SIGINT stop is written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step

def progress_postfix(record: dict, with_teacher: bool) -> dict[str, str]:
    """The progress bar's postfix for a step's log record: the loss, its CE and KD terms only when
    there is a KD term (``with_teacher``: sft/lora, or alpha 0, have loss = CE), the learning rate the
    step used, tokens/s, and the latest validation loss when the step has one."""
    postfix = {"loss": f"{record['loss']:.3f}"}
    if with_teacher:
        postfix.update(ce=f"{record['ce']:.3f}", kd=f"{record['kd']:.3f}")
    if "val_loss" in record:
        postfix["val"] = f"{record['val_loss']:.3f}"
    postfix.update({"lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"})
    return postfix


def training_hash(cfg: Config, dataset_hash: str | None) -> str:
    """What a checkpoint's numbers depend on: :meth:`Config.fingerprint` of the data/teacher/student/
    distill sections and the prepared dataset. Resuming under a different hash is refused."""
    return cfg.fingerprint(FINGERPRINT_SECTIONS, extra={"dataset_hash": dataset_hash})


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class DistillTrainer(SetupMixin, StepMixin, EvalMixin, CheckpointMixin):
    """setup → train → save → cleanup (torchtune-style recipe).

    Subclasses may override :meth:`load_student`, :meth:`load_teacher` and :meth:`load_tokenizer`
    (the benchmark builds random-init models in memory that way)."""

    def __init__(self, cfg: Config, inputs: TrainerInputs, workdir: str | Path):
        self.workdir = Path(workdir)
        self.cfg = cfg
        self.inputs = inputs
        self.d = self.cfg.distill
        self.method = self.d.method
        self.checkpoint_root = checkpoint_root(cfg, self.workdir)
        self.dataset_card = DatasetCard.read(self.inputs.dataset)
        self.config_hash = training_hash(self.cfg, self.dataset_card.dataset_hash)
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.teacher: nn.Module | None = None
        self.topk = None
        self.start_step = 0
        self.history: list[dict] = []
        self.resumed_from: int | None = None
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient norm
        self._stop_signal: int | None = None

    @classmethod
    def from_workdir(cls, workdir: str | Path) -> DistillTrainer:
        """The trainer of a work folder written by :func:`llmneo.launch.write_workdir` (torchrun's entry)."""
        cfg, inputs = read_workdir(workdir)
        return cls(cfg, inputs, workdir)

    def already_complete(self) -> bool:
        """A previous attempt finished with the same configuration (e.g. a KFP retry after the step
        itself succeeded): nothing to do."""
        out = self.workdir / ("adapter" if self.method in LORA_METHODS else "model")
        if not self.d.resume or not cards.exists(self.workdir) or not out.is_dir():
            return False
        try:
            return DistillCard.read(self.workdir).complete_for(self.config_hash)
        except UserError:
            return False  # a garbled card is a stale one
    def _logged(self, record: dict) -> bool:
        """Records written to train_log.jsonl: every log_every-th step, the last and every validation."""
        return record["step"] % self.d.log_every == 0 or record["step"] == self.max_steps or "val_loss" in record

    def _validates(self, step: int) -> bool:
        d = self.d
        return bool(d.eval_every and self.val_rows and (step % d.eval_every == 0 or step == self.max_steps))

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> int:
        """The signal that asked to stop, agreed by all ranks (0 = keep going)."""
        flag = torch.tensor([self._stop_signal or 0], dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def train(self) -> list[dict]:
        from tqdm import tqdm

        d = self.d
        previous = [signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)]
        log_f = tb = None
        if self.rank == 0:
            log_f = open(self.workdir / "train_log.jsonl", "w")  # rewritten: a resumed run drops later lines
            for record in self.history:
                if self._logged(record):
                    log_f.write(json.dumps(record) + "\n")
            tb = self._tensorboard()
        label = os.environ.get(STEP_LABEL_ENV)
        bar = tqdm(total=self.max_steps, initial=self.start_step,
                   desc=f"[{label}] {self.method}" if label else f"distill[{self.method}]",
                   disable=self.rank != 0, file=sys.stderr, dynamic_ncols=True)
        with_teacher = self.distill_module.spec.alpha > 0
        try:
            for step in range(self.start_step, self.max_steps):
                record = self.train_step(step)
                if self._validates(record["step"]):
                    record.update(self.validation_loss())
                self.history.append(record)
                if log_f and self._logged(record):
                    log_f.write(json.dumps(record) + "\n")
                    log_f.flush()
                if tb:
                    for key in ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
                        tb.add_scalar(f"train/{key}", record[key], record["step"])
                    for key in ("val_loss", "val_ce", "val_kd"):
                        if key in record:
                            tb.add_scalar(f"val/{key.removeprefix('val_')}", record[key], record["step"])
                bar.set_postfix(progress_postfix(record, with_teacher))
                bar.update(1)
                stop = self._stop_requested()
                periodic = d.save_every and record["step"] % d.save_every == 0 and record["step"] < self.max_steps
                if stop or periodic:
                    self.save_checkpoint(record["step"])
                if stop:
                    raise Preempted(stop, record["step"])
        finally:
            bar.close()
            if log_f:
                log_f.close()
            if tb:
                tb.close()
            for s, handler in zip((signal.SIGTERM, signal.SIGINT), previous, strict=True):
                signal.signal(s, handler)
        return self.history

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed attempt logged after its last checkpoint are dropped
        return SummaryWriter(str(self.workdir / "tensorboard"), purge_step=self.start_step + 1)
    # ------------------------------------------------------------------ save
    def save(self, history: list[dict]) -> DistillCard | None:
        """Final weights (adapter/ or model/), loss curve, card.json (last). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        lora = self.method in LORA_METHODS
        # full (unsharded) tensors on rank 0, gathered from FSDP shards when sharded
        state = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora))
        card = None
        if self.rank == 0:
            state = {k.removeprefix("student."): v for k, v in state.items()}
            if lora:
                save_adapter(self.student, self.workdir / "adapter", state)
            else:
                self.student.save_pretrained(self.workdir / "model", state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(self.workdir / "model")
            card = self._write_card(history)
        if dist.is_initialized():
            dist.barrier()
        if not self.d.keep_checkpoint and self.rank == 0:
            import shutil

            shutil.rmtree(self.checkpoint_root, ignore_errors=True)
        return card

    def _write_card(self, history: list[dict]) -> DistillCard:
        from llmneo.report import plot_loss

        d = self.d
        png = plot_loss(history, self.workdir / "loss_curve.png")
        last = next((h for h in reversed(history) if not h.get("skipped")), history[-1])
        seconds = sum(h["seconds"] for h in history)
        val_history = [{k: h[k] for k in ("step", "val_loss", "val_ce", "val_kd") if k in h}
                       for h in history if "val_loss" in h]
        card = DistillCard(
            kind="adapter" if self.method in LORA_METHODS else "model",
            status="complete", method=self.method, steps=len(history), world_size=self.world,
            strategy=d.strategy if self.world > 1 else "single", global_batch_size=d.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            alpha=d.alpha, temperature=d.temperature, divergence=d.divergence,
            teacher_mode=self.cfg.teacher.mode if self.method in KD_METHODS else None,
            topk_tail=d.topk_tail if self.topk is not None else None,
            lora_variant=d.lora_variant if self.method in LORA_METHODS else None,
            lora_rank=d.lora_rank if self.method in LORA_METHODS else None,
            trainable_parameters=self.trainable_count,
            final={k: last[k] for k in ("loss", "ce", "kd")},
            tokens_per_s=sum(h["tokens"] for h in history) / max(seconds, 1e-9),
            peak_mem_mb=max(h["peak_mem_mb"] for h in history),
            seconds=round(seconds, 2), resumed_from_step=self.resumed_from,
            nonfinite_steps_skipped=self.nonfinite_steps,
            loss_curve=png.name if png else None,
            val_loss=val_history[-1]["val_loss"] if val_history else None, val_history=val_history,
            dataset_hash=self.dataset_card.dataset_hash, config_hash=self.config_hash,
        )
        return card.write(self.workdir)

    def cleanup(self, barrier: bool = True) -> None:
        if dist.is_initialized():
            if barrier:
                dist.barrier()  # rank 0 may still be saving
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: never outlive it as an orphan
        die_with_parent(signal.SIGKILL, os.getppid())
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        trainer = DistillTrainer.from_workdir(args.workdir)
    except UserError as e:
        if rank0:
            report_error(str(e))
        return 2
    if trainer.already_complete():
        if rank0:
            print(f"distill: {args.workdir} already holds a complete run of this configuration; nothing to do",
                  file=sys.stderr)
        return 0
    if rank0:  # a stale card (other configuration, earlier run) must not outlive a failed training
        cards.remove(args.workdir)
    barrier = False
    try:
        trainer.setup()
        history = trainer.train()
        trainer.save(history)
        barrier = True
    except Preempted as e:
        barrier = True
        if rank0:
            print(f"distill: {e}; checkpoint saved in {trainer.checkpoint_root}; re-run to resume",
                  file=sys.stderr)
        return 128 + e.signum
    except UserError as e:
        if rank0:
            report_error(str(e))
        return 2
    except Exception as e:  # a full disk, a denied permission: one line; other errors keep their traceback
        mapped = environment_error(e, trainer.workdir)
        if mapped is None:
            raise
        if rank0:
            report_error(str(mapped))
        return 2
    finally:
        trainer.cleanup(barrier)
    return 0


if __name__ == "__main__":
    sys.exit(main())
