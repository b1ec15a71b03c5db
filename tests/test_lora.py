"""LoRA variants: MoSLoRA (ours) saves, loads and merges; peft LoRA/DoRA/rsLoRA merge through the same
`merge_adapter`; only adapter parameters are trainable."""

import math
from types import SimpleNamespace

import pytest
import torch

from llmneo.errors import UserError
from llmneo.lora import (
    MOSLORA_CONFIG,
    MoSLoRALinear,
    apply_lora,
    base_model,
    merge_adapter,
    save_adapter,
)
from llmneo.models import build_tiny_llama


def tiny_model():
    shape = SimpleNamespace(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, seed=3)
    return build_tiny_llama(shape, vocab_size=64).eval()


def distill_cfg(variant, r=4, alpha=8.0, targets="all-linear"):
    return SimpleNamespace(lora_variant=variant, lora_rank=r, lora_alpha=alpha, lora_dropout=0.0,
                           lora_targets=targets)


def perturb_adapter(model, seed=0):
    """Random adapter weights (B starts at zero, which would make every check trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def test_moslora_layer_shapes_init_and_trainable_set():
    model = apply_lora(tiny_model(), distill_cfg("moslora", r=4))
    layers = [m for m in model.modules() if isinstance(m, MoSLoRALinear)]
    assert len(layers) == 2 * 7  # q k v o gate up down per decoder layer; the LM head is not adapted
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.shape == (4, 32) and q.lora_mixer.weight.shape == (4, 4) and q.lora_B.weight.shape == (32, 4)
    assert q.lora_mixer.weight.abs().sum().item() > 0 and q.lora_B.weight.abs().sum().item() == 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert logits(model, IDS).equal(logits(tiny_model(), IDS))  # B = 0: starts as the base model


def test_moslora_merged_forward_equals_unmerged(tmp_path):
    model = apply_lora(tiny_model(), distill_cfg("moslora", r=4, alpha=8.0))
    perturb_adapter(model)
    unmerged = logits(model, IDS)
    assert not unmerged.allclose(logits(tiny_model(), IDS), atol=1e-3)  # the adapter does something
    q = model.model.layers[0].self_attn.q_proj
    delta = 2.0 * q.lora_B.weight @ q.lora_mixer.weight @ q.lora_A.weight  # alpha / r = 2
    assert torch.allclose(q.delta_weight(), delta, atol=1e-6)

    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / MOSLORA_CONFIG).is_file()
    merged = merge_adapter(tiny_model(), tmp_path / "adapter")  # a fresh base + the saved folder
    assert not any(isinstance(m, MoSLoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny_model().state_dict())  # a plain HF model again
    assert torch.allclose(logits(merged, IDS), unmerged, atol=1e-5)


def test_moslora_load_rejects_mismatched_weights(tmp_path):
    model = apply_lora(tiny_model(), distill_cfg("moslora", targets="q_proj"))
    save_adapter(model, tmp_path / "a")
    def other(hidden, layers):
        return build_tiny_llama(SimpleNamespace(hidden_size=hidden, intermediate_size=48, num_layers=layers,
                                                num_heads=4, num_kv_heads=2, seed=3), vocab_size=64)

    with pytest.raises(UserError, match="adapter weights do not match the model .*wrong shape"):
        merge_adapter(other(48, 2), tmp_path / "a")
    with pytest.raises(UserError, match="'model.layers.1.self_attn.q_proj' is not a Linear layer"):
        merge_adapter(other(32, 1), tmp_path / "a")


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_peft_variants_merge_to_the_adapter_forward(variant, tmp_path):
    model = apply_lora(tiny_model(), distill_cfg(variant, r=4, alpha=8.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in trainable)
    perturb_adapter(model)
    if variant == "dora":  # keep DoRA magnitudes near the weight norms (a sensible operating point)
        for m in model.modules():
            if hasattr(m, "lora_magnitude_vector") and "default" in getattr(m, "lora_magnitude_vector", {}):
                with torch.no_grad():
                    m.lora_magnitude_vector["default"].weight.abs_().add_(0.5)
    q = base_model(model).model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8.0 / math.sqrt(4) if variant == "rslora" else 8.0 / 4)
    adapted = logits(model, IDS)
    save_adapter(model, tmp_path / "adapter")
    merged = merge_adapter(tiny_model(), tmp_path / "adapter")
    assert set(merged.state_dict()) == set(tiny_model().state_dict())
    assert torch.allclose(logits(merged, IDS), adapted, atol=1e-4)


def test_targets_by_name_and_a_clear_error():
    model = apply_lora(tiny_model(), distill_cfg("moslora", targets="q_proj,v_proj"))
    assert sum(isinstance(m, MoSLoRALinear) for m in model.modules()) == 4
    with pytest.raises(UserError, match=r"^distill.lora_targets: no Linear module matches"):
        apply_lora(tiny_model(), distill_cfg("lora", targets="qkv"))


def test_merge_adapter_rejects_a_non_adapter_folder(tmp_path):
    with pytest.raises(UserError, match="not an adapter folder"):
        merge_adapter(tiny_model(), tmp_path)
