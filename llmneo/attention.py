"""Causal attention chosen on the host: no attention mask built (and read) in every training forward.

transformers (5.x) builds an attention mask in every model forward
(``masking_utils.create_causal_mask``). Without a 2D mask it reads the position ids on the device to
look for packed sequences (``find_packed_sequence_indices``: ``if (...).all()``); with one it reads
the mask (``_ignore_causal_mask_sdpa``). Either is a device→host synchronisation per forward: the
host waits for the GPU (for the student, the whole teacher forward queued before it) before it can
queue the rest of the step.

llmneo's training rows are right-padded and attention is causal, so no labelled position sees the
padding: plain causal attention is exact for them. :func:`use_causal_attention` registers PyTorch's
SDPA under a name of its own in transformers' ``AttentionInterface`` but not in its mask interface;
for such an implementation ``masking_utils._preprocess_mask_arguments`` returns no mask without
looking at the inputs, and ``integrations.sdpa_attention.sdpa_attention_forward`` then runs SDPA with
``is_causal=True`` (the flash / memory-efficient kernels). It is used only where it is exact: a model
on SDPA whose layers are all full causal attention (no sliding window), rows that are not packed, and
only after the model's logits under it equal its own masked forward on a right-padded batch;
otherwise the model keeps its implementation (correct, one synchronisation per forward).
"""

from __future__ import annotations

import torch
from torch import nn

from llmneo.heads import _check_ids, _EvalMode, _param, _relative_error

CAUSAL_SDPA = "llmneo_causal_sdpa"


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def full_causal(config) -> bool:
    """Every layer is full causal attention (no sliding window, no other layer kind)."""
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None)
    return not layer_types or all(t == "full_attention" for t in layer_types)


@torch.no_grad()
def use_causal_attention(model: nn.Module, n_tokens: int = 9, padded_from: int = 6) -> bool:
    """Switch ``model`` (a transformers causal LM) to :data:`CAUSAL_SDPA` when that is exact for
    right-padded rows; True when it did. Checked on two fixed rows, the second right-padded from
    ``padded_from``: the logits of every unpadded position must equal the model's own SDPA forward
    with the attention mask (to the dtype's rounding, :mod:`llmneo.heads`)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not full_causal(config):
        return False
    _register()
    with _EvalMode(model):
        ids = _check_ids(model, n_tokens).repeat(2, 1).to(_param(model).device)
        mask = torch.ones_like(ids)
        mask[1, padded_from:] = 0
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        model.set_attn_implementation(CAUSAL_SDPA)
        got = model(input_ids=ids, use_cache=False).logits
    keep = mask.bool()
    err, scale, tol = _relative_error(got[keep], want[keep])
    if err <= tol * max(scale, 1e-6):
        return True
    model.set_attn_implementation("sdpa")
    return False
