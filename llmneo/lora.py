"""LoRA variants for the student: LoRA, DoRA and rsLoRA through peft, and MoSLoRA (implemented here).

    model = apply_lora(model, cfg.distill)        # trainable adapter, base frozen
    save_adapter(model, "out/adapter")            # peft format, or MoSLoRA format (below)
    merged = merge_adapter(base_model, "out/adapter")   # plain HF model, adapter folded into W

MoSLoRA (Wu et al. 2024, arXiv 2406.11909) puts a trainable r×r *mixer* M between LoRA's A and B::

    y = W·x + (α/r)·B·M·A·dropout(x)        A [r, in], M [r, r], B [out, r]

so the r subspaces of A and B are mixed instead of paired one to one (plain LoRA is M = I). As in the
authors' code, A and M start Kaiming-uniform and B at zero (so the model starts equal to its base).
peft has no MoSLoRA, so its adapter folder has its own small format::

    adapter/moslora_config.json          {"format": "moslora", "version": 1, "r", "lora_alpha",
                                          "lora_dropout", "target_modules": [module names]}
    adapter/adapter_model.safetensors    "<module>.lora_A.weight", ".lora_mixer.weight", ".lora_B.weight"

Merging replaces each wrapped Linear with one whose weight is ``W + (α/r)·B·M·A``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from llmneo.errors import UserError

MOSLORA_CONFIG = "moslora_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def linear_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules to adapt: every Linear except the output head for
    ``"all-linear"`` (peft's rule), else those whose last name component is listed."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = None if targets == "all-linear" else set(
        [t.strip() for t in targets.split(",")] if isinstance(targets, str) else targets)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not head
             and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise UserError(f"distill.lora_targets: no Linear module matches {targets!r}")
    return names


# --------------------------------------------------------------------------------------------
# MoSLoRA
# --------------------------------------------------------------------------------------------


class MoSLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus the MoSLoRA branch ``(α/r)·B·M·A``.

    Shapes: input ``[..., in]`` → output ``[..., out]``; ``lora_A`` ``[r, in]``, ``lora_mixer``
    ``[r, r]``, ``lora_B`` ``[out, r]`` (stored as ``nn.Linear`` weights, fp32 like the base)."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **kw)
        self.lora_mixer = nn.Linear(r, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_mixer.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `.weight` (dtype, device) sees the base's
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.lora_B(self.lora_mixer(self.lora_A(self.lora_dropout(x))))
        return self.base_layer(x) + branch * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``(α/r)·B·M·A`` ``[out, in]`` in fp32."""
        b, m, a = (w.weight.float() for w in (self.lora_B, self.lora_mixer, self.lora_A))
        return self.scaling * (b @ m @ a)

    def merged(self) -> nn.Linear:
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((base.weight.float() + self.delta_weight()).to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_moslora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                  targets: str | list[str] = "all-linear", module_names: list[str] | None = None) -> nn.Module:
    """Wrap the target Linears of ``model`` in place; freeze everything but the MoSLoRA weights.

    ``module_names`` (full dotted names, as saved in ``moslora_config.json``) overrides ``targets``."""
    names = linear_targets(model, targets) if module_names is None else list(module_names)
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            raise UserError(f"MoSLoRA target {name!r} is not a Linear layer of this model "
                            f"(adapter from another architecture?)")
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, MoSLoRALinear(model.get_submodule(name), r, lora_alpha, lora_dropout))
    model.moslora_config = {"format": "moslora", "version": 1, "r": r, "lora_alpha": lora_alpha,
                            "lora_dropout": lora_dropout, "target_modules": names}
    return model


def moslora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """The adapter tensors (``...lora_A/lora_mixer/lora_B.weight``) of ``model`` or of a given
    state dict of it."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    return {k: v for k, v in state_dict.items() if ".lora_" in k}


def merge_moslora(model: nn.Module) -> nn.Module:
    """Fold every MoSLoRA branch into its Linear (in place); returns the plain model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MoSLoRALinear):
            _set_submodule(model, name, module.merged())
    if hasattr(model, "moslora_config"):
        del model.moslora_config
    return model


def load_moslora(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject MoSLoRA into ``model`` as described by ``adapter_dir`` and load its weights."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / MOSLORA_CONFIG).read_text())
    if cfg.get("format") != "moslora":
        raise UserError(f"{adapter_dir / MOSLORA_CONFIG}: not a MoSLoRA adapter config")
    apply_moslora(model, cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], module_names=cfg["target_modules"])
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    expected = moslora_state_dict(model)
    missing = sorted(set(expected) - set(weights))
    wrong_shape = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    if missing or wrong_shape or set(weights) - set(expected):
        raise UserError(f"{adapter_dir}: adapter weights do not match the model (missing {missing[:3]}, "
                        f"unexpected {sorted(set(weights) - set(expected))[:3]}, wrong shape {wrong_shape[:3]})")
    model.load_state_dict(weights, strict=False)
    return model


# --------------------------------------------------------------------------------------------
# One entry point for every variant
# --------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, distill) -> nn.Module:
    """Add the configured adapter (``distill.lora_variant``) to ``model``; only it is trainable.

    Returns a peft ``PeftModel`` (lora, dora, rslora) or ``model`` itself with MoSLoRA layers."""
    targets = distill.lora_targets if distill.lora_targets == "all-linear" else [
        t.strip() for t in distill.lora_targets.split(",") if t.strip()]
    if distill.lora_variant == "moslora":
        return apply_moslora(model, distill.lora_rank, distill.lora_alpha, distill.lora_dropout, targets)
    from peft import LoraConfig, get_peft_model

    linear_targets(model, targets)  # same one-line error as MoSLoRA when nothing matches
    cfg = LoraConfig(r=distill.lora_rank, lora_alpha=distill.lora_alpha, lora_dropout=distill.lora_dropout,
                     target_modules=targets, task_type="CAUSAL_LM",
                     use_dora=distill.lora_variant == "dora", use_rslora=distill.lora_variant == "rslora")
    return get_peft_model(model, cfg)


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face ``*ForCausalLM`` inside a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_adapter(model: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write the adapter of ``model`` (peft format or MoSLoRA format) into ``out_dir``.

    ``state_dict``: the model's (trainable) tensors gathered by the caller, e.g. full tensors from
    FSDP shards; keys as in ``model.state_dict()``. Default: read them from ``model``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "moslora_config"):
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in moslora_state_dict(model, state_dict).items()}
        save_file(tensors, str(out_dir / ADAPTER_WEIGHTS))
        (out_dir / MOSLORA_CONFIG).write_text(json.dumps(model.moslora_config, indent=2) + "\n")
    else:
        model.save_pretrained(str(out_dir), state_dict=state_dict)
    return out_dir


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / MOSLORA_CONFIG).is_file() or (Path(path) / PEFT_CONFIG).is_file()


def merge_adapter(base_model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Base HF model + adapter folder (peft LoRA/DoRA/rsLoRA, or MoSLoRA) → merged plain HF model.

    The returned model has the base's architecture and parameter names, with the adapter folded into
    the weights (so it saves and loads with ``from_pretrained`` alone)."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / MOSLORA_CONFIG).is_file():
        return merge_moslora(load_moslora(base_model, adapter_dir))
    if not (adapter_dir / PEFT_CONFIG).is_file():
        raise UserError(f"{adapter_dir}: no {PEFT_CONFIG} or {MOSLORA_CONFIG}; not an adapter folder")
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
