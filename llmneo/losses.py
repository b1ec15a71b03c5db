"""The NEO loss: (1-α)·CE(labels) + α·T²·D(teacher‖student), computed on next-token positions.

The loss is configured once, by a :class:`LossSpec` built from ``DistillConfig`` (same field names);
its :meth:`LossSpec.combine` is the one place where CE and KD are weighed. Two entry points with the
same numerics:

- :func:`distill_loss` takes full logits ``[B, L, V]`` (reference; small inputs, tests) and
  :func:`selected_loss` the logits of the selected positions (the ``distill.loss_impl=naive``
  baseline of the benchmark);
- :func:`chunked_distill_loss` takes final hidden states of the *selected* positions ``[N, H]`` and
  the output heads, and never materializes more than ``chunk_tokens × V`` fp32 logits at a time. Each
  chunk's backward is done right away inside the forward (the gradient w.r.t. the hidden states and
  the head parameters is kept, the logits are freed), so nothing is recomputed in backward; for the
  default forward KL (also against the offline top-k, and CE alone) the logits' gradient is even
  written in closed form, in place.

The teacher's targets for the selected positions come from a teacher signal (:mod:`llmneo.signals`):
*online*, its logits (or, chunk by chunk, its hidden states through its head: :class:`TeacherHead`),
or *offline*, the top-k log-probabilities cached by the teacher step (:class:`TeacherTopK`, from
:mod:`llmneo.topk`), compared with a sparse divergence (:func:`topk_divergence`; how the mass outside
the top-k is treated is ``topk_tail``).

Alignment: labels are unshifted (HF convention). Position ``t`` predicts ``labels[t+1]``; CE and KD
both use exactly the positions where ``labels[:, 1:] != -100``. (The seed's code masks KD with the
unshifted labels, one position off; ``tests/test_losses.py`` catches that mistake.)

Reduction: sums over tokens are returned with the token count, so the trainer can divide by the
number of target tokens in the *global* batch (equal across world sizes and accumulation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmneo.data_output import IGNORE_INDEX  # labels with no loss (the data contract: -100)

# Log-probabilities of "impossible" entries in the sparse (top-k) path: finite, so that no -inf - -inf
# or 0·inf ever reaches autograd, and exp(LOG_FLOOR) == 0 in fp32, so they weigh nothing.
LOG_FLOOR = -1.0e4
TOPK_TAILS = ("tail", "renormalize")


@dataclass(frozen=True)
class LossSpec:
    """The distillation loss, configured once: ``(1-alpha)·CE + alpha·T²·D(teacher‖student)``. Field
    names and defaults are those of :class:`llmneo.config.DistillConfig`."""

    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    jsd_beta: float = 0.5
    topk_tail: str = "tail"  # offline teacher: tail | renormalize
    loss_chunk_tokens: int = 512
    loss_impl: str = "chunked"  # chunked | naive
    # not a configuration field: the trainer sets it from distill.compile as resolved for its device
    compiled: bool = False  # the closed-form chunk losses through torch.compile

    @classmethod
    def from_config(cls, distill: Any) -> LossSpec:
        """The loss fields of a ``DistillConfig`` (or anything with attributes of the same names)."""
        return cls(**{f.name: getattr(distill, f.name) for f in dataclasses.fields(cls) if f.name != "compiled"})

    def with_teacher(self, present: bool) -> LossSpec:
        """The spec in effect: without a teacher signal there is no KD term, so alpha is 0 (CE alone)."""
        return self if present else dataclasses.replace(self, alpha=0.0)

    def combine(self, ce, kd):
        """(1-α)·ce + α·T²·kd: tensors or floats, sums or means."""
        return (1.0 - self.alpha) * ce + self.alpha * self.temperature**2 * kd

    @property
    def is_forward_kl(self) -> bool:
        """D is KL(teacher‖student) (JSD with β=0 is the same)."""
        return self.divergence == "forward_kl" or (self.divergence == "jsd" and self.jsd_beta == 0.0)


@dataclass
class LossSums:
    """Per-micro-batch sums; divide by the global token count to get means."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    tokens: int


@dataclass
class TeacherTopK:
    """Offline teacher targets for ``N`` positions: ``ids`` ``[N, k]`` int64 and ``logprobs`` ``[N, k]``
    (the teacher's log-softmax at temperature 1, as cached by the teacher step)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    # every id < the student's vocabulary, known on the host (None: unknown, checked on the device,
    # which makes the host wait for it)
    in_vocab: bool | None = None

    def __getitem__(self, sl) -> TeacherTopK:
        return TeacherTopK(self.ids[sl], self.logprobs[sl], self.in_vocab)

    def chunk(self, sl: slice) -> TeacherTopK:
        return self[sl]


@dataclass
class TeacherHead:
    """Online teacher targets for ``N`` positions, computed chunk by chunk: the teacher's final hidden
    states ``[N, H']`` (no grad) and its LM head (with its soft-capping: :func:`llmneo.heads.logits_head`);
    :meth:`chunk` gives the logits ``[n, V']`` of a slice,
    so the full ``[N, V']`` logits never exist at once."""

    hidden: torch.Tensor
    head: Callable

    def chunk(self, sl: slice) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.hidden[sl])


# --------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p·(log p − log q) over the last dim, from normalized log-probs."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def divergence_from_logprobs(s: torch.Tensor, t: torch.Tensor, spec: LossSpec = LossSpec()) -> torch.Tensor:
    """D(teacher‖student) for normalized log-probs ``s`` (student) and ``t`` (teacher) ``[N, K]`` on the
    same support, ``spec.divergence``: ``forward_kl`` = KL(t‖s), ``reverse_kl`` = KL(s‖t), ``jsd`` =
    generalized JSD(β = ``spec.jsd_beta``) as in TRL's GKD: β·KL(t‖m) + (1-β)·KL(s‖m),
    m = β·t + (1-β)·s (β=0 → forward KL, β=1 → reverse KL)."""
    kind, beta = spec.divergence, spec.jsd_beta
    if spec.is_forward_kl:
        return _kl(t, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(s, t)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    raise ValueError(f"unknown divergence {kind!r}")


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: LossSpec = LossSpec()) -> torch.Tensor:
    """Per-token divergence between teacher and student distributions over the full vocabulary.

    Args:
        student_logits: ``[N, V]`` (any float dtype; computed in fp32).
        teacher_logits: ``[N, V']`` with ``V' >= V``; extra (padding) columns are sliced off.
        spec: ``divergence`` (default ``forward_kl``; see :func:`divergence_from_logprobs`),
            ``jsd_beta`` and ``temperature`` (the softmax temperature applied to both).
    Returns:
        ``[N]`` fp32, not scaled by T².
    """
    vocab, temperature = student_logits.shape[-1], spec.temperature
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1)
    return divergence_from_logprobs(s, t, spec)


def _teacher_topk_logprobs(teacher: TeacherTopK, vocab: int, temperature: float, tail: str):
    """The teacher's distribution on the coarse support: (log-probs of the k ids ``[N, k]``, log-prob
    of the tail bucket ``[N]`` or None for ``renormalize``), both at temperature T and normalized.
    Ids ``>= vocab`` get LOG_FLOOR (probability 0)."""
    valid = teacher.ids < vocab
    t_top = (teacher.logprobs.float() / temperature).masked_fill(~valid, LOG_FLOOR)
    if tail == "renormalize":
        return F.log_softmax(t_top, -1), None
    n_tail = vocab - valid.sum(-1)  # tokens outside the top-k (ids are distinct)
    # teacher tail mass at T=1 (≥ a tiny floor: fp16 storage can make Σ p_i round above 1)
    p_tail = (1.0 - teacher.logprobs.float().masked_fill(~valid, -math.inf).exp().sum(-1)).clamp(min=1e-8)
    n = n_tail.clamp(min=1).float()
    t_tail = torch.where(n_tail > 0, n.log() + (p_tail / n).log() / temperature, LOG_FLOOR)  # log Σ (p/n)^(1/T)
    t_full = F.log_softmax(torch.cat([t_top, t_tail.unsqueeze(-1)], dim=-1), -1)
    return t_full[:, :-1], t_full[:, -1]


def topk_divergence(student_logits: torch.Tensor, teacher: TeacherTopK, spec: LossSpec = LossSpec()) -> torch.Tensor:
    """Sparse divergence against cached teacher top-k log-probs (offline teacher).

    Args:
        student_logits: ``[N, V]`` full-vocabulary student logits (fp32 inside).
        teacher: top-k ``ids`` / ``logprobs`` ``[N, k]`` (distinct ids per row); ids ``>= V`` (teacher
            padding columns) are dropped.
        spec: ``divergence``, ``jsd_beta``, ``temperature``, and ``topk_tail``: what to do with the
            teacher mass outside its top-k (``P_tail = 1 − Σ_k p_i``):

            - ``"tail"`` (default): one extra "everything else" bucket. Both distributions are coarsened
              to k+1 categories — the k ids and the tail — and D is computed exactly on those (for
              KL this is a lower bound of the full-vocabulary KL, tight when the tail is small). The
              student's tail is its exact mass outside the k ids, so it is also pushed to put no more
              mass outside the teacher's top-k than the teacher does. At T ≠ 1 the teacher's tail is
              tempered as if spread uniformly over the V−k remaining tokens (exact at T = 1).
            - ``"renormalize"``: both distributions are restricted to the k ids and renormalized
              there; the tail is ignored. Exact at any T for the restricted distributions.

            When the k ids cover the whole vocabulary both equal the full-vocabulary divergence.
    Returns:
        ``[N]`` fp32, not scaled by T².
    """
    temperature, tail = spec.temperature, spec.topk_tail
    if tail not in TOPK_TAILS:
        raise ValueError(f"unknown top-k tail policy {tail!r}; expected one of {TOPK_TAILS}")
    vocab = student_logits.shape[-1]
    valid = teacher.ids < vocab
    ids = teacher.ids.clamp(max=vocab - 1)
    t_top, t_tail = _teacher_topk_logprobs(teacher, vocab, temperature, tail)
    if tail == "renormalize":
        s_top = (student_logits.float() / temperature).gather(-1, ids).masked_fill(~valid, LOG_FLOOR)
        return divergence_from_logprobs(F.log_softmax(s_top, -1), t_top, spec)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s_logp.gather(-1, ids).masked_fill(~valid, LOG_FLOOR)
    in_topk = torch.zeros_like(s_logp, dtype=torch.int32).scatter_add_(-1, ids, valid.int()) > 0
    has_tail = (~in_topk).any(-1)
    s_tail = torch.logsumexp(s_logp.masked_fill(in_topk, LOG_FLOOR), dim=-1)
    s_full = torch.cat([s_top, torch.where(has_tail, s_tail, LOG_FLOOR).unsqueeze(-1)], dim=-1)
    t_full = torch.cat([t_top, t_tail.unsqueeze(-1)], dim=-1)
    return divergence_from_logprobs(s_full.clamp(min=LOG_FLOOR), t_full, spec)


# --------------------------------------------------------------------------------------------
# The loss on selected positions
# --------------------------------------------------------------------------------------------


def shift_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask ``[B, L-1]`` of positions that predict a label, their targets ``[N]``)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``index`` ``[N]``, ``targets`` ``[N]``): the positions that predict a label, as indices into
    ``x.flatten(0, 1)`` of a ``[B, L, ...]`` tensor (row-major: the order of ``shift_mask``), and their
    next-token ids. Computed where ``labels`` are — the trainer calls it on the host, so the device
    selects with :func:`gather_positions` and never waits for a mask's size."""
    mask, targets = shift_mask(labels)
    rows, cols = mask.nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, targets


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, :-1][mask]`` for ``[B, L, ...]`` ``x`` and the ``index`` of :func:`target_positions`,
    without a device→host synchronisation (an index_select of known size)."""
    return x.flatten(0, 1).index_select(0, index)


def token_loss(student_logits: torch.Tensor, targets: torch.Tensor,
               teacher: torch.Tensor | TeacherTopK | None, spec: LossSpec):
    """Sums over ``N`` selected positions: (loss, ce, kd) with loss = ``spec.combine(ce, kd)``.

    ``student_logits`` ``[N, V]``; ``teacher``: logits ``[N, V']`` (online), :class:`TeacherTopK`
    (offline) or None (CE only, kd = 0)."""
    logits = student_logits.float()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if teacher is None:
        kd = logits.new_zeros(())
    elif isinstance(teacher, TeacherTopK):
        kd = topk_divergence(logits, teacher, spec).sum()
    else:
        kd = divergence(logits, teacher, spec).sum()
    return spec.combine(ce, kd), ce, kd


def selected_loss(student_logits: torch.Tensor, targets: torch.Tensor,
                  teacher: torch.Tensor | TeacherTopK | None, spec: LossSpec) -> LossSums:
    """The naive NEO loss on the full-vocabulary logits ``[N, V]`` of the ``N`` selected positions
    (``teacher`` as in :func:`token_loss`): the reference the chunked loss is tested against."""
    loss, ce, kd = token_loss(student_logits, targets, teacher, spec)
    return LossSums(loss, ce.detach(), kd.detach(), int(targets.shape[0]))


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                 teacher: torch.Tensor | TeacherTopK | None, spec: LossSpec) -> LossSums:
    """Reference NEO loss on full logits ``[B, L, V]`` and unshifted labels ``[B, L]``.

    ``teacher``: the teacher's logits ``[B, L, V']``, or the offline :class:`TeacherTopK` targets of
    the selected positions (row-major order), or None."""
    mask, targets = shift_mask(labels)
    if isinstance(teacher, torch.Tensor):
        teacher = teacher[:, :-1][mask]
    return selected_loss(student_logits[:, :-1][mask].float(), targets, teacher, spec)


# --------------------------------------------------------------------------------------------
# Chunked: bounded logits memory, backward done chunk by chunk inside the forward
# --------------------------------------------------------------------------------------------


def _ce_forward_kl_with_grad(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                             spec: LossSpec):
    """(loss, ce, kd, d loss / d logits) for (1-α)·CE + α·T²·KL(teacher‖student) on ``[n, V]`` logits,
    with the gradient in closed form instead of autograd:

        d CE / dz = softmax(z) − onehot(y),      d T²·KL / dz = T·(softmax(z/T) − softmax(u/T))

    Computed in place, so about four ``[n, V]`` fp32 buffers are alive at the peak (autograd through
    log-softmaxes keeps about ten). ``logits`` and ``teacher_logits`` may be overwritten. The default
    (forward KL, and CE alone) takes this path; reverse KL, JSD and top-k targets go through autograd."""
    alpha, temperature = spec.alpha, spec.temperature
    z = logits.float()
    rows = torch.arange(z.shape[0], device=z.device)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    ce = (lse.squeeze(-1) - z[rows, targets]).sum()
    if teacher_logits is None:
        grad = z.sub_(lse).exp_().mul_(1.0 - alpha)  # z is now (1-α)·softmax(z)
        grad[rows, targets] -= 1.0 - alpha
        kd = ce.new_zeros(())
        return spec.combine(ce, kd), ce, kd, grad
    t = teacher_logits[:, : z.shape[-1]].float()  # fresh per chunk: overwritten below
    if temperature != 1.0:
        t = t / temperature
    t_logp = t.sub_(torch.logsumexp(t, dim=-1, keepdim=True))
    if temperature == 1.0:
        s_logp = z - lse
    else:
        s_logp = z / temperature
        s_logp.sub_(torch.logsumexp(s_logp, dim=-1, keepdim=True))
    t_prob = t_logp.exp()
    diff = t_logp.sub_(s_logp)  # log p_t − log p_s (in the teacher's buffer)
    kd = torch.dot(t_prob.flatten(), diff.flatten())  # Σ p_t·(log p_t − log p_s), no [n, V] temporary
    del diff, t_logp
    s_prob = s_logp.exp_()  # softmax(z/T)
    if temperature == 1.0:  # both terms share softmax(z): grad = p_s − α·p_t − (1-α)·onehot
        grad = s_prob.sub_(t_prob, alpha=alpha)
    else:
        grad = z.sub_(lse).exp_().mul_(1.0 - alpha).add_(s_prob.sub_(t_prob), alpha=alpha * temperature)
    grad[rows, targets] -= 1.0 - alpha
    return spec.combine(ce, kd), ce, kd, grad


def _topk_forward_kl_with_grad(logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTopK, spec: LossSpec):
    """(loss, ce, kd, d loss / d logits) for (1-α)·CE + α·T²·(sparse forward KL on the cached top-k
    set S), gradient in closed form (u = z/T, q = softmax(u), P = the teacher on the coarse support):

    - ``tail``: d KL / du = q − p̃, with p̃ = P on S and, outside S, the teacher's tail mass spread
      like the student's own tail: p̃_j = P_tail · softmax(u | not S)_j;
    - ``renormalize``: d KL / du = Q_S − P_S on S (Q = softmax(u) restricted to S), 0 elsewhere.

    All ids must be < V (the caller falls back to autograd otherwise). ``logits`` may be overwritten."""
    alpha, temperature, tail = spec.alpha, spec.temperature, spec.topk_tail
    z = logits.float()
    rows = torch.arange(z.shape[0], device=z.device)
    ids = teacher.ids
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    ce = (lse.squeeze(-1) - z[rows, targets]).sum()
    t_top, t_tail = _teacher_topk_logprobs(teacher, z.shape[-1], temperature, tail)
    p_top = t_top.exp()
    u = z / temperature if temperature != 1.0 else z
    lse_u = lse if temperature == 1.0 else torch.logsumexp(u, dim=-1, keepdim=True)
    u_top = u.gather(-1, ids)
    if tail == "renormalize":
        q_logp = F.log_softmax(u_top, -1)
        kd = (p_top * (t_top - q_logp)).sum()
        kd_grad = None  # zero outside S
    else:
        q_logp = u_top - lse_u
        masked = u.scatter(-1, ids, -math.inf)  # u outside S
        lse_tail = torch.logsumexp(masked, dim=-1, keepdim=True)  # -inf when S covers the vocabulary
        has_tail = torch.isfinite(lse_tail)
        lse_tail = torch.where(has_tail, lse_tail, 0.0)
        log_p_tail = t_tail.unsqueeze(-1)
        p_tail = torch.where(has_tail, log_p_tail.exp(), 0.0)
        kd = (p_top * (t_top - q_logp)).sum() + torch.where(
            has_tail, p_tail * (log_p_tail - (lse_tail - lse_u)), 0.0).sum()
        # outside S: q_j − P_tail·softmax(u | not S)_j (both terms ≤ 1, no 1/q_tail); 0 on S (-inf there)
        spread = (masked - lse_tail).exp_().mul_(p_tail)
        kd_grad = masked.sub_(lse_u).exp_().sub_(spread)
        del spread, masked
    kd_top = q_logp.exp() - p_top  # on S: q_i − P_i (renormalize: Q_i − P_i)
    # combine with CE: (1-α)·(softmax(z) − onehot) + α·T·kd_grad
    grad = z.sub_(lse).exp_().mul_(1.0 - alpha)  # z is now (1-α)·softmax(z)
    if kd_grad is not None:
        grad.add_(kd_grad, alpha=alpha * temperature)
    grad.scatter_add_(-1, ids, kd_top.mul_(alpha * temperature))
    grad[rows, targets] -= 1.0 - alpha
    return spec.combine(ce, kd), ce, kd, grad


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, teacher, spec: LossSpec):
    """(loss, ce, kd, d loss / d logits) of one chunk; ``logits`` ``[n, V]`` (no graph, may be overwritten)."""
    if teacher is None or (spec.is_forward_kl and not isinstance(teacher, TeacherTopK)):
        return _closed_form(_ce_forward_kl_with_grad, spec)(logits, targets, teacher, spec)
    if spec.is_forward_kl and (teacher.in_vocab or (teacher.in_vocab is None
                                                    and bool((teacher.ids < logits.shape[-1]).all()))):
        return _closed_form(_topk_forward_kl_with_grad, spec)(logits, targets, teacher, spec)
    leaf = logits.detach().float().requires_grad_()
    with torch.enable_grad():
        loss, ce, kd = token_loss(leaf, targets, teacher, spec)
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), ce.detach(), kd.detach(), grad


_COMPILED: dict[Callable, Callable] = {}


def _closed_form(fn: Callable, spec: LossSpec) -> Callable:
    """``fn``, or with ``spec.compiled`` its ``torch.compile`` (one per function, dynamic in the
    chunk's length: the last chunk of a micro-batch is shorter). Element-wise chains over ``[n, V]``
    fuse into a few kernels instead of a launch per op."""
    if not spec.compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss(head(hidden)) in token chunks; per chunk the logits' gradient is taken at once and turned
    into gradients w.r.t. ``hidden`` and the head's trainable parameters, then the logits are freed.
    ``backward`` only scales the stored gradients (no recomputation, unlike checkpointing)."""

    @staticmethod
    def forward(ctx, hidden, head, chunk_loss, chunk_tokens, *head_params):
        n = hidden.shape[0]
        need_h = ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) if ctx.needs_input_grad[4 + i] else None
                       for i, p in enumerate(head_params)]
        wrt_params = [p for p, g in zip(head_params, grad_params, strict=True) if g is not None]
        loss = hidden.new_zeros((), dtype=torch.float32)
        ce_sum, kd_sum = loss.clone(), loss.clone()
        for start in range(0, n, chunk_tokens):
            sl = slice(start, min(n, start + chunk_tokens))
            h = hidden[sl].detach().requires_grad_(need_h)
            with torch.enable_grad():
                logits = head(h)
            part, ce, kd, grad_logits = chunk_loss(sl, logits.detach())
            inputs = ([h] if need_h else []) + wrt_params
            grads = list(torch.autograd.grad(logits, inputs, grad_outputs=grad_logits.to(logits.dtype)))
            del logits, grad_logits  # the chunk's [n, V] buffers die here
            if need_h:
                grad_hidden[sl] = grads.pop(0)
            for g in grad_params:
                if g is not None:
                    g += grads.pop(0).float()
            loss += part
            ce_sum += ce
            kd_sum += kd
        ctx.save_for_backward(*([grad_hidden] if need_h else []),
                              *[g for g in grad_params if g is not None])
        ctx.layout = (need_h, [g is not None for g in grad_params],
                      [p.dtype for p in head_params])
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        saved = list(ctx.saved_tensors)
        need_h, has_param_grad, dtypes = ctx.layout
        grad_hidden = saved.pop(0) * grad_loss if need_h else None
        grad_params = [saved.pop(0).mul(grad_loss).to(dt) if has else None
                       for has, dt in zip(has_param_grad, dtypes, strict=True)]
        return grad_hidden, None, None, None, *grad_params


def chunked_distill_loss(student_hidden: torch.Tensor, targets: torch.Tensor, student_head: Callable,
                         teacher: TeacherHead | TeacherTopK | None, spec: LossSpec) -> LossSums:
    """NEO loss from hidden states of the selected positions, in chunks of ``spec.loss_chunk_tokens``.

    Args:
        student_hidden: ``[N, H]`` final hidden states at positions that predict a label.
        targets: ``[N]`` next-token ids.
        student_head: maps ``[n, H]`` → ``[n, V]`` logits (the LM head with the model's final
            soft-capping, :func:`llmneo.heads.logits_head`; trainable or not, any module).
        teacher: the teacher's targets for the same ``N`` positions, taken chunk by chunk
            (``teacher.chunk(slice)``): :class:`TeacherHead` (online: hidden states + head, run under
            no_grad per chunk), :class:`TeacherTopK` (offline) or None (CE only).
        spec: the loss; peak fp32 logits memory is ``loss_chunk_tokens × V × 4`` bytes (× a few for
            softmax temporaries), independent of sequence length and batch size.
    Returns:
        :class:`LossSums`; ``loss`` carries the gradient to ``student_hidden`` and the head.
    """

    def teacher_chunk(sl: slice):
        return None if teacher is None else teacher.chunk(sl)

    def chunk_loss_and_grad(sl: slice, logits: torch.Tensor):
        return _chunk_loss_and_grad(logits, targets[sl], teacher_chunk(sl), spec)

    n, chunk_tokens = student_hidden.shape[0], spec.loss_chunk_tokens
    params = [p for p in student_head.parameters() if p.requires_grad] if isinstance(student_head, nn.Module) else []
    if torch.is_grad_enabled() and (student_hidden.requires_grad or params):
        loss, ce, kd = _ChunkedHeadLoss.apply(student_hidden, student_head, chunk_loss_and_grad, chunk_tokens,
                                              *params)
        return LossSums(loss, ce, kd, n)
    loss = student_hidden.new_zeros((), dtype=torch.float32)
    ce_sum, kd_sum = loss.clone(), loss.clone()
    for start in range(0, n, chunk_tokens):
        sl = slice(start, min(n, start + chunk_tokens))
        part, ce, kd = token_loss(student_head(student_hidden[sl]), targets[sl], teacher_chunk(sl), spec)
        loss, ce_sum, kd_sum = loss + part, ce_sum + ce, kd_sum + kd
    return LossSums(loss, ce_sum, kd_sum, n)
