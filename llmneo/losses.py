"""The NEO loss: (1-α)·CE(labels) + α·T²·D(teacher‖student), computed on next-token positions.

Two entry points with the same numerics:

- :func:`distill_loss` takes full logits ``[B, L, V]`` (reference; small inputs, tests);
- :func:`chunked_distill_loss` takes final hidden states of the *selected* positions ``[N, H]`` and
  the output heads, and never materializes more than ``chunk_tokens × V`` fp32 logits at a time:
  each chunk is recomputed in backward (activation checkpointing) instead of being stored.

Alignment: labels are unshifted (HF convention). Position ``t`` predicts ``labels[t+1]``; CE and KD
both use exactly the positions where ``labels[:, 1:] != -100``. (The seed's code masks KD with the
unshifted labels, one position off; ``tests/test_losses.py`` catches that mistake.)

Reduction: sums over tokens are returned with the token count, so the trainer can divide by the
number of target tokens in the *global* batch (equal across world sizes and accumulation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


@dataclass
class LossSums:
    """Per-micro-batch sums; divide by the global token count to get means."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    tokens: int


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
               temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence between teacher and student distributions.

    Args:
        student_logits: ``[N, V]`` (any float dtype; computed in fp32).
        teacher_logits: ``[N, V']`` with ``V' >= V``; extra (padding) columns are sliced off.
        kind: ``forward_kl`` = KL(teacher‖student), ``reverse_kl`` = KL(student‖teacher), ``jsd`` =
            generalized JSD(β) as in TRL's GKD (β=0 → forward KL, β=1 → reverse KL).
        temperature: softmax temperature applied to both.
    Returns:
        ``[N]`` fp32, not scaled by T².
    """
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def shift_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask ``[B, L-1]`` of positions that predict a label, their targets ``[N]``)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                 alpha: float, temperature: float = 1.0, kind: str = "forward_kl",
                 beta: float = 0.5) -> LossSums:
    """Reference NEO loss on full logits ``[B, L, V]`` and unshifted labels ``[B, L]``."""
    mask, targets = shift_mask(labels)
    s = student_logits[:, :-1][mask].float()
    ce = F.cross_entropy(s, targets, reduction="sum")
    if teacher_logits is None:
        kd = torch.zeros((), device=s.device)
    else:
        kd = divergence(s, teacher_logits[:, :-1][mask], kind, temperature, beta).sum()
    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kd
    return LossSums(loss, ce.detach(), kd.detach(), int(mask.sum()))


def _chunk_terms(student_h: torch.Tensor, targets: torch.Tensor, teacher_h: torch.Tensor | None,
                 head: Callable, teacher_head: Callable | None, alpha: float, temperature: float, kind: str,
                 beta: float):
    logits = head(student_h).float()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if teacher_h is None:
        kd = torch.zeros((), device=logits.device)
    else:
        # inside the checkpointed function: teacher logits are recomputed in backward, never stored
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_h)
        kd = divergence(logits, teacher_logits, kind, temperature, beta).sum()
    return (1.0 - alpha) * ce + alpha * temperature**2 * kd, ce, kd


def chunked_distill_loss(student_hidden: torch.Tensor, targets: torch.Tensor, student_head: Callable,
                         teacher_hidden: torch.Tensor | None = None, teacher_head: Callable | None = None,
                         alpha: float = 0.5, temperature: float = 1.0, kind: str = "forward_kl",
                         beta: float = 0.5, chunk_tokens: int = 512) -> LossSums:
    """NEO loss from hidden states of the selected positions, in token chunks.

    Args:
        student_hidden: ``[N, H]`` final hidden states at positions that predict a label.
        targets: ``[N]`` next-token ids.
        student_head: maps ``[n, H]`` → ``[n, V]`` logits (the LM head; trainable or not).
        teacher_hidden: ``[N, H']`` teacher hidden states at the same positions (no grad), or None.
        teacher_head: the teacher's LM head.
        chunk_tokens: tokens per chunk; peak fp32 logits memory is ``chunk_tokens × V × 4`` bytes
            (× 2-3 for softmax temporaries), independent of sequence length and batch size.
    """
    use_teacher = teacher_hidden is not None
    n = student_hidden.shape[0]
    loss = student_hidden.new_zeros((), dtype=torch.float32)
    ce_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    kd_sum = torch.zeros_like(ce_sum)
    for start in range(0, n, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        t_hidden = teacher_hidden[sl] if use_teacher else None
        args = (student_hidden[sl], targets[sl], t_hidden, student_head, teacher_head, alpha, temperature,
                kind, beta)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            part, ce, kd = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            part, ce, kd = _chunk_terms(*args)
        loss = loss + part
        ce_sum += ce.detach()
        kd_sum += kd.detach()
    return LossSums(loss, ce_sum, kd_sum, n)
