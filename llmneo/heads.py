"""Logits from final hidden states: the model's LM head plus its final logit soft-capping.

Several paths compute logits from hidden states themselves instead of calling the model (the
chunked loss, the teacher's top-k cache, the fidelity evaluation), so that only the selected
positions ever get a ``[n, V]`` tensor. Models such as Gemma-2 apply ``tanh(z / c) · c`` to the
head's output (``final_logit_softcapping = c``) inside their own forward; every such path must do
the same or its logits are not the model's. :func:`logits_head` is the one place that does it.
"""

from __future__ import annotations

import torch
from torch import nn


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


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``tanh(logits / cap) · cap`` (as Hugging Face's Gemma models compute it), or ``logits``."""
    return torch.tanh(logits / cap) * cap if cap else logits


class SoftcappedHead(nn.Module):
    """An LM head followed by soft-capping. The head is a submodule, so ``parameters()`` are the
    head's own (a trainable head gets its gradient through the cap)."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head = head
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.head(hidden), self.cap)


def logits_head(model: nn.Module, head: nn.Module | None = None) -> nn.Module:
    """hidden ``[..., H]`` → the model's logits ``[..., V]``: ``head`` (default the model's output
    embedding) with the model's final soft-capping, if any; the plain head otherwise."""
    head = model.get_output_embeddings() if head is None else head
    cap = final_logit_softcap(model)
    return SoftcappedHead(head, cap) if cap else head


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
    """The model's logits for final hidden states ``hidden`` (see :func:`logits_head`)."""
    return logits_head(model, head)(hidden)
