"""The training step: the module DDP/FSDP wrap (student forward + loss), the host-side micro-batch,
and one optimizer step over the global batch (:class:`StepMixin`, a part of
:class:`llmneo.trainer.DistillTrainer`)."""

from __future__ import annotations

import math
import random
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llmneo.data import IGNORE_INDEX, collate
from llmneo.errors import UserError
from llmneo.heads import logits_head
from llmneo.lora import base_model
from llmneo.losses import LossSpec, chunked_distill_loss, gather_positions, selected_loss, target_positions
from llmneo.signals import TeacherSignal


class NonFiniteTraining(UserError):
    """Training produced a non-finite loss or gradient norm more often than allowed."""


# --------------------------------------------------------------------------------------------
# The model that DDP/FSDP wrap: student forward + loss
# --------------------------------------------------------------------------------------------


class DistillModule(nn.Module):
    """Student forward + NEO loss in one module, so DDP/FSDP wrap exactly what has gradients.

    The loss is ``spec`` (:class:`llmneo.losses.LossSpec`); the teacher is a signal
    (:mod:`llmneo.signals`) held outside the module tree (frozen, never wrapped or sharded). ``spec``
    in effect (:attr:`spec`) has alpha = 0 while no signal is set."""

    def __init__(self, student: nn.Module, spec: LossSpec):
        super().__init__()
        self.student = student
        self.configured_spec = spec
        self._signal: list[TeacherSignal | None] = [None]  # a list: not registered as a submodule
        self.set_signal(None)

    @property
    def signal(self) -> TeacherSignal | None:
        return self._signal[0]

    def set_signal(self, signal: TeacherSignal | None) -> None:
        self._signal[0] = signal
        self.spec = self.configured_spec.with_teacher(signal is not None)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, target_index=None,
                target_ids=None, **signal_rows):
        """Sums over the micro-batch's target tokens: (loss, ce, kd). Packed rows come with
        ``position_ids`` and no ``attention_mask`` (:func:`llmneo.data.collate`); ``signal_rows``
        are what the signal added to the batch (:meth:`TeacherSignal.batch_rows`). ``target_index`` /
        ``target_ids``: :func:`llmneo.losses.target_positions` of ``labels``, computed on the host by
        :func:`device_batch` (else here, which makes a device wait for the mask's size)."""
        spec, signal = self.spec, self._signal[0]
        inputs = {"input_ids": input_ids, "use_cache": False}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        elif attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if target_index is None:
            target_index, target_ids = target_positions(labels)
        chunked = spec.loss_impl == "chunked"
        teacher = signal.targets(inputs, target_index, signal_rows, chunked=chunked) if signal is not None else None
        if not chunked:  # full [B, L, V] fp32 logits: the reference / benchmark baseline
            logits = gather_positions(self.student(**inputs).logits, target_index).float()
            sums = selected_loss(logits, target_ids, teacher, spec)
            return sums.loss, sums.ce, sums.kd
        base = base_model(self.student)
        hidden = gather_positions(base.get_decoder()(**inputs).last_hidden_state, target_index)
        sums = chunked_distill_loss(hidden, target_ids, logits_head(base), teacher, spec)
        return sums.loss, sums.ce, sums.kd


def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated micro-batch (:func:`llmneo.data.collate`, on the host) ready for
    :meth:`DistillModule.forward` on ``device`` without any device→host synchronisation:

    - the positions to train on are selected here, from the labels on the host
      (:func:`llmneo.losses.target_positions`);
    - the ``attention_mask`` of plain rows is dropped: rows are right-padded and attention is causal,
      so no labelled position ever sees the padding, and without a mask transformers takes the causal
      kernel path instead of reading the mask on the device to find that out (packed rows keep
      their ``position_ids``: transformers still inspects those on the device);
    - tensors are copied with ``non_blocking=True`` (from pinned memory on CUDA)."""
    batch = dict(batch)
    batch["target_index"], batch["target_ids"] = target_positions(batch["labels"])
    batch.pop("attention_mask", None)
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def lr_lambda(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warmup over ``warmup_ratio·total`` steps, then cosine to 0."""
    warmup = int(round(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def count_targets(rows: list[dict]) -> int:
    """Next-token positions with a label (what the loss averages over)."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM of its own address space (``ru_maxrss`` would
    include the parent's peak when it was started by vfork+exec, as subprocess and torchrun do)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; other systems: an estimate


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


class StepMixin:
    """Data order, micro-batches and the optimizer step of :class:`llmneo.trainer.DistillTrainer`."""

    # ------------------------------------------------------------------ data order
    def global_batch(self, step: int) -> list[int]:
        """Train-row indices of optimizer step ``step``: a seeded permutation per epoch, concatenated."""
        g, n = self.d.global_batch_size, len(self.train_rows)
        out = []
        for pos in range(step * g, (step + 1) * g):
            epoch, idx = divmod(pos, n)
            if epoch not in self._perms:
                perm = list(range(n))
                random.Random(self.d.seed * 1_000_003 + epoch).shuffle(perm)
                self._perms = {epoch: perm}
            out.append(self._perms[epoch][idx])
        return out

    def micro_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([self.train_rows[i] for i in indices], self.pad_id)
        if self.distill_module.signal is not None:
            batch.update(self.distill_module.signal.batch_rows(indices))
        return device_batch(batch, self.device)

    # ------------------------------------------------------------------ train
    def _grad_sync(self, enabled: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        if hasattr(self.module, "set_requires_gradient_sync"):  # FSDP2
            self.module.set_requires_gradient_sync(enabled)
            return nullcontext()
        if hasattr(self.module, "no_sync") and not enabled:  # DDP
            return self.module.no_sync()
        return nullcontext()

    def micro_step(self, inputs: dict[str, torch.Tensor], n_tokens: int, last: bool):
        """Forward + backward of one micro-batch (gradients accumulate); returns its (ce, kd) sums as
        device tensors. ``last``: the step's last micro-batch, where DDP/FSDP reduce the gradients."""
        with self._grad_sync(last):
            with self.autocast:
                loss, ce, kd = self.module(**inputs)
            # DDP/FSDP average gradients over ranks: scale by world / global target tokens
            (loss * self.world / max(1, n_tokens)).backward()
        return ce, kd

    def train_step(self, step: int) -> dict:
        """One optimizer step over the global batch of ``step``; returns its log record."""
        d = self.d
        t0 = time.perf_counter()
        batch = self.global_batch(step)
        n_tokens = sum(self.targets_per_row[i] for i in batch)
        share = len(batch) // self.world
        mine = batch[self.rank * share:(self.rank + 1) * share]
        ce_sum = torch.zeros((), device=self.device)
        kd_sum = torch.zeros((), device=self.device)
        seen_tokens = 0
        for micro in range(self.accum):
            rows = mine[micro * self.micro_batch_size:(micro + 1) * self.micro_batch_size]
            seen_tokens += sum(len(self.train_rows[i]["input_ids"]) for i in rows)
            ce, kd = self.micro_step(self.micro_batch(rows), n_tokens, last=micro == self.accum - 1)
            ce_sum += ce
            kd_sum += kd
        if self.world > 1:
            stats = torch.stack([ce_sum, kd_sum, torch.tensor(float(seen_tokens), device=self.device)])
            dist.all_reduce(stats)
            ce_sum, kd_sum, seen_tokens = stats[0], stats[1], int(stats[2])
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.trainable, d.max_grad_norm if d.max_grad_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        # the loss sums are all-reduced and the norm is global: every rank takes the same decision
        grad_norm = float(grad_norm)  # also waits for the GPU: the timing below is real
        ce_mean, kd_mean = float(ce_sum) / max(1, n_tokens), float(kd_sum) / max(1, n_tokens)
        finite = all(map(math.isfinite, (ce_mean, kd_mean, grad_norm)))
        if finite:
            self.optimizer.step()
        else:
            self._nonfinite(step, ce_mean, kd_mean, grad_norm)
        with warnings.catch_warnings():  # torch warns when the first step of all is a skipped one
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()  # also on a skipped step: the schedule stays a function of the step
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": self.distill_module.spec.combine(ce_mean, kd_mean),
                  "ce": ce_mean, "kd": kd_mean, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": seen_tokens / dt, "tokens": seen_tokens, "target_tokens": n_tokens,
                  "peak_mem_mb": peak_memory_mb(self.device), "seconds": dt}
        return record if finite else {**record, "skipped": True}

    def _nonfinite(self, step: int, ce: float, kd: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm is NaN/inf is never applied: skipped while
        ``distill.max_nonfinite_steps`` allows, else training stops (no adapter, no card)."""
        self.nonfinite_steps += 1
        what = f"ce={ce}, kd={kd}, grad_norm={grad_norm}"
        if self.nonfinite_steps > self.d.max_nonfinite_steps:
            raise NonFiniteTraining(
                f"distill: non-finite loss or gradient at step {step + 1} ({what}); training stopped, nothing "
                f"written (check distill.lr and the data; a corrupt checkpoint: distill.resume=false; "
                f"distill.max_nonfinite_steps={self.d.max_nonfinite_steps} skipped steps allowed)")
        if self.rank == 0:
            print(f"distill: warning: step {step + 1} skipped, non-finite ({what}); "
                  f"{self.nonfinite_steps}/{self.d.max_nonfinite_steps} allowed", file=sys.stderr, flush=True)

