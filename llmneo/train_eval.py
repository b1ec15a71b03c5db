"""Evaluation during training: the training loss on the val split (:class:`EvalMixin`, a part of
:class:`llmneo.trainer.DistillTrainer`)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from llmneo.data import collate
from llmneo.signals import OnlineTeacher
from llmneo.train_step import device_batch


class EvalMixin:
    """validation_loss() of :class:`llmneo.trainer.DistillTrainer`."""

    def validation_loss(self) -> dict[str, float]:
        """The training loss on the val split, per target token: ``val_loss``, ``val_ce`` and, with an
        online teacher, ``val_kd`` (the top-k cache of ``teacher.mode=offline`` holds the train split
        only, so there val_loss is the CE). Collective: each rank takes every world-th micro-batch and
        the sums are all-reduced, so 1 and N processes give the same value."""
        module, rows, mb = self.distill_module, self.val_rows, self.micro_batch_size
        batches = [list(range(i, min(i + mb, len(rows)))) for i in range(0, len(rows), mb)]
        mine = batches[self.rank::self.world]
        signal = module.signal
        online = isinstance(signal, OnlineTeacher)
        if not online:
            module.set_signal(None)
        spec = module.spec
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # ce, kd, target tokens
        self.student.eval()
        try:
            with torch.no_grad():
                # every rank runs the same number of forwards: FSDP all-gathers in each one
                for i in range(math.ceil(len(batches) / self.world)):
                    indices = mine[i] if i < len(mine) else batches[0]
                    batch = collate([rows[j] for j in indices], self.pad_id)
                    with self.autocast:
                        _, ce, kd = module(**device_batch(batch, self.device))
                    if i < len(mine):
                        sums += torch.stack([torch.as_tensor(ce, dtype=torch.float64, device=self.device),
                                             torch.as_tensor(kd, dtype=torch.float64, device=self.device),
                                             torch.tensor(float(sum(self.val_targets[j] for j in indices)),
                                                          dtype=torch.float64, device=self.device)])
        finally:
            self.student.train()
            if not online:
                module.set_signal(signal)
        if self.world > 1:
            dist.all_reduce(sums)
        tokens = max(1.0, float(sums[2]))
        ce, kd = float(sums[0]) / tokens, float(sums[1]) / tokens
        out = {"val_loss": spec.combine(ce, kd), "val_ce": ce}
        if online:
            out["val_kd"] = kd
        return out

