"""Logits from final hidden states: the model's LM head plus what its forward does to the head's output.

Several paths compute logits from hidden states themselves instead of calling the model (the
chunked loss, the teacher's top-k cache, the fidelity evaluation), so that only the selected
positions ever get a ``[n, V]`` tensor. Some architectures change the head's output inside their own
forward: Granite divides it by ``config.logits_scaling``, Cohere multiplies it by
``config.logit_scale``, Gemma-2/3 apply ``tanh(z / c) · c`` (``final_logit_softcapping = c``). Every
such path must do the same or its logits are not the model's. :func:`logits_head` is the one place
that does it, and :func:`check_logits_head` proves it at set-up on a few tokens, so that the next
architecture with its own twist is refused instead of trained on the wrong objective.

Packing (docs/data.md, "Packing") relies on the model building a block-diagonal mask from restarting
``position_ids``; :func:`check_packing` proves that at set-up too (OPT, for one, does not).
"""

from __future__ import annotations

import torch
from torch import nn

from llmneo.errors import UserError


def final_logit_softcap(model: nn.Module) -> float | None:
    """The model's ``final_logit_softcapping`` (None or 0 = none); multimodal configs keep it in
    their text config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and hasattr(config, "get_text_config"):
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return float(cap) if cap else None


def _config_value(model: nn.Module, name: str):
    config = getattr(model, "config", None)
    if config is None:
        return None
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def logit_scale(model: nn.Module) -> float | None:
    """The factor the model's forward multiplies its head's output by (None = 1): ``1 / logits_scaling``
    (Granite and its MoE variants) or ``logit_scale`` (Cohere)."""
    scale = 1.0
    divisor = _config_value(model, "logits_scaling")
    if divisor:
        scale /= float(divisor)
    factor = _config_value(model, "logit_scale")
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor:
        scale *= float(factor)
    return None if scale == 1.0 else scale


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``tanh(logits / cap) · cap`` (as Hugging Face's Gemma models compute it), or ``logits``."""
    return torch.tanh(logits / cap) * cap if cap else logits


class ModelHead(nn.Module):
    """An LM head followed by the model's scaling and soft-capping. The head is a submodule, so
    ``parameters()`` are the head's own (a trainable head gets its gradient through both)."""

    def __init__(self, head: nn.Module, scale: float | None = None, cap: float | None = None):
        super().__init__()
        self.head = head
        self.scale = scale
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        return softcap(logits, self.cap)


def logits_head(model: nn.Module, head: nn.Module | None = None) -> nn.Module:
    """hidden ``[..., H]`` → the model's logits ``[..., V]``: ``head`` (default the model's output
    embedding) with the model's logit scaling and final soft-capping, if any; the plain head otherwise."""
    head = model.get_output_embeddings() if head is None else head
    scale, cap = logit_scale(model), final_logit_softcap(model)
    return ModelHead(head, scale, cap) if scale is not None or cap else head


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
    """The model's logits for final hidden states ``hidden`` (see :func:`logits_head`)."""
    return logits_head(model, head)(hidden)


# --------------------------------------------------------------------------------------------
# Set-up checks: the fast paths compute what the model computes
# --------------------------------------------------------------------------------------------

CHECK_TOKENS = 8  # tokens per check: one short forward, seconds even for an 8B model on CPU
# max |Δ| allowed relative to the largest reference logit. The paths run the same operations, so in
# fp32 they agree to rounding; in bf16/fp16 a different kernel or shape may round differently. A
# wrong scale or a leaking mask is off by a large fraction of the logits (Granite: 1 - 1/8).
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 3e-2}


class HeadMismatch(UserError):
    """A model's logits from the head path differ from its own forward's (an architecture llmneo
    does not know how to reproduce), or its packed rows are not isolated."""


def model_type(model: nn.Module) -> str:
    """``config.model_type`` (e.g. ``granite``), or the class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _check_ids(model: nn.Module, n: int) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)  # fixed tokens, and the global RNG stays untouched
    return torch.randint(1, max(2, vocab), (1, n), generator=g)


def _param(model: nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.is_floating_point())


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float]:
    """(max |got - want|, max |want|, the dtype's tolerance as a fraction of max |want|)."""
    tol = _TOLERANCE.get(got.dtype, 1e-2)
    got, want = got.float(), want.float()
    return float((got - want).abs().max()), float(want.abs().max()), tol


class _EvalMode:
    """Eval mode (no dropout: the check consumes no randomness) for the check's duration."""

    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


@torch.no_grad()
def check_logits_head(model: nn.Module, role: str, head: nn.Module | None = None,
                      hidden_fn=None, n_tokens: int = CHECK_TOKENS) -> None:
    """Refuse (:class:`HeadMismatch`, one line) a model whose :func:`logits_head` path does not give
    ``model(ids).logits`` on a few fixed tokens.

    Args:
        role: what the model is, for the message (``student``, ``teacher``, ``model 'distilled'``).
        head: the head module to check (default :func:`logits_head` of ``model``).
        hidden_fn: ``ids [1, n] → final hidden states [1, n, H]`` as the caller computes them
            (default the model's decoder).
    """
    with _EvalMode(model):
        ids = _check_ids(model, n_tokens).to(_param(model).device)
        want = model(input_ids=ids, use_cache=False).logits
        if hidden_fn is None:
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        else:
            hidden = hidden_fn(ids)
        got = (logits_head(model) if head is None else head)(hidden)
    if got.shape != want.shape:
        raise HeadMismatch(f"{role} ({model_type(model)}): logits from its LM head have shape {tuple(got.shape)}, "
                           f"its forward gives {tuple(want.shape)}: this architecture is not supported")
    err, scale, tol = _relative_error(got, want)
    if not err <= tol * max(scale, 1e-6):
        raise HeadMismatch(f"{role} ({model_type(model)}): logits from its LM head differ from its own forward "
                           f"(max |Δ| {err:.3g} of max |logit| {scale:.3g}): this architecture changes its "
                           f"logits in a way llmneo does not reproduce, so it is refused rather than trained "
                           f"or evaluated on the wrong numbers")


@torch.no_grad()
def check_packing(model: nn.Module, role: str, lengths: tuple[int, ...] = (5, 7)) -> None:
    """Refuse (:class:`HeadMismatch`, one line) packing for a model whose logits over a packed row
    (documents side by side, ``position_ids`` restarting at 0 for each, no attention mask — as
    :func:`llmneo.data.collate` builds it) differ from its logits over each document alone: then a
    packed row's loss is not the sum of its documents' losses (attention crosses documents)."""
    with _EvalMode(model):
        device = _param(model).device
        ids = _check_ids(model, sum(lengths)).to(device)
        docs = ids.split(list(lengths), dim=1)
        positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(input_ids=d, attention_mask=torch.ones_like(d), use_cache=False).logits
                           for d in docs], dim=1)
    err, scale, tol = _relative_error(packed, alone)
    if not err <= tol * max(scale, 1e-6):
        raise HeadMismatch(f"{role} ({model_type(model)}): data.packing is not supported for this model type: "
                           f"its attention crosses packed documents (logits differ by {err:.3g} of max "
                           f"{scale:.3g}); set data.packing=false and prepare the data again")


def check_fast_paths(model: nn.Module, role: str, *, head: bool = True, packed: bool = False) -> None:
    """The set-up checks a caller needs: :func:`check_logits_head` when it computes logits from hidden
    states (``head``), :func:`check_packing` when its rows are packed (``packed``)."""
    if head:
        check_logits_head(model, role)
    if packed:
        check_packing(model, role)
