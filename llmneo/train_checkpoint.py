"""Checkpoint I/O of a training run: pick and load the checkpoint to resume from, save one
(:class:`CheckpointMixin`, a part of :class:`llmneo.trainer.DistillTrainer`; the format is
:mod:`llmneo.checkpointing`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llmneo import checkpointing
from llmneo.errors import UserError


class CheckpointMixin:
    """Resume and save of :class:`llmneo.trainer.DistillTrainer`."""

    def _choose_checkpoint(self, skip: dict[str, str]) -> Path | None:
        """Rank 0 picks the newest checkpoint that verifies (:func:`checkpointing.select`) and tells
        the others, so that every rank loads the same one."""
        choice, error = -1, None
        if self.rank == 0:
            try:
                path = checkpointing.select(self.checkpoint_root, skip)
                choice = -1 if path is None else checkpointing.step_of(path)
            except UserError as e:
                choice, error = -2, e
        if self.world > 1:
            flag = torch.tensor([choice], dtype=torch.int64, device=self.device)
            dist.broadcast(flag, src=0)
            choice = int(flag)
        if choice == -2:
            raise error or checkpointing.CheckpointInvalid(
                f"{self.checkpoint_root}: no valid checkpoint (see rank 0's message)")
        return None if choice == -1 else self.checkpoint_root / f"step-{choice:06d}"

    def _setup_resume(self) -> None:
        if not self.d.resume:
            return
        failed: dict[str, str] = {}  # folder name -> why it did not load (select's warning names it)
        while (path := self._choose_checkpoint(failed)) is not None:
            state = checkpointing.verify_state(path)
            if state["config_hash"] != self.config_hash:
                raise UserError(f"{path}: checkpoint of a different configuration or dataset (hash "
                                f"{state['config_hash']}, now {self.config_hash}); use a fresh output folder "
                                f"or distill.resume=false")
            try:
                checkpointing.load(path, self.module, self.optimizer, self.rank, self.device)
            except checkpointing.CheckpointInvalid as e:  # verified, yet does not load: try an older one
                failed[path.name] = str(e)
                continue
            self.scheduler.load_state_dict(state["scheduler"])
            self.start_step = self.resumed_from = state["step"]
            self.history = state["history"]
            self.nonfinite_steps = sum(1 for r in self.history if r.get("skipped"))
            if self.rank == 0:
                print(f"distill: resuming from {path} (step {self.start_step}/{self.max_steps})",
                      file=sys.stderr, flush=True)
            return

    def save_checkpoint(self, step: int) -> Path:
        state = {"step": step, "data_position": {"step": step, "rows_consumed": step * self.d.global_batch_size},
                 "scheduler": self.scheduler.state_dict(), "history": self.history,
                 "config_hash": self.config_hash, "world_size": self.world, "method": self.method}
        return checkpointing.save(self.checkpoint_root, step, self.module, self.optimizer, state, self.rank,
                                  self.device, keep=self.d.keep_last_checkpoints)

