"""Merge the adapter into the base student, then evaluate fidelity to the teacher on the val split.

Fidelity metrics (per target token of the val split, next-token positions as in training):
``kl_to_teacher`` = mean KL(teacher‖student), ``top1_agreement`` = share of positions where the
student's argmax equals the teacher's, ``perplexity`` = exp(mean CE on the labels). Reported for the
base (untrained) student, the distilled student and the teacher, side by side.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from llmneo.config import Config
from llmneo.data import read_split
from llmneo.errors import UserError
from llmneo.losses import divergence, shift_mask
from llmneo.models import load_causal_lm, model_location, read_card, write_card
from llmneo.trainer import collate


def merge(student_artifact: str | Path, distill_dir: str | Path, out_dir: str | Path):
    """Base student + LoRA adapter → merged HF model in ``out_dir`` (or copy a full-weights result)."""
    from transformers import AutoTokenizer

    distill_dir, out_dir = Path(distill_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_location(student_artifact)[0])
    if (distill_dir / "adapter").is_dir():
        from llmneo.lora import merge_adapter  # peft LoRA/DoRA/rsLoRA or MoSLoRA

        model = merge_adapter(load_causal_lm(student_artifact, dtype=torch.float32), distill_dir / "adapter")
    elif (distill_dir / "model").is_dir():
        model = load_causal_lm(distill_dir / "model", dtype=torch.float32)
    else:
        raise UserError(f"{distill_dir}: neither adapter/ nor model/ found; is it a distill output?")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    return model, tokenizer


@torch.no_grad()
def fidelity(models: dict[str, torch.nn.Module], teacher: torch.nn.Module, rows: list[dict], pad_id: int,
             batch_size: int = 4, max_batches: int = 0) -> dict[str, dict[str, float]]:
    """KL(teacher‖model), top-1 agreement with the teacher and perplexity for each model."""
    sums = {name: {"kl": 0.0, "agree": 0.0, "nll": 0.0} for name in models}
    sums["teacher"] = {"kl": 0.0, "agree": 0.0, "nll": 0.0}
    n_tokens = 0
    for b, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches and b >= max_batches:
            break
        batch = collate(rows[start:start + batch_size], pad_id)
        mask, targets = shift_mask(batch["labels"])
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_sel = t_logits[:, :-1][mask].float()
        n_tokens += int(mask.sum())
        sums["teacher"]["agree"] += float(mask.sum())
        sums["teacher"]["nll"] += float(torch.nn.functional.cross_entropy(t_sel, targets, reduction="sum"))
        for name, model in models.items():
            s_sel = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s_sel = s_sel[:, :-1][mask].float()
            vocab = s_sel.shape[-1]
            sums[name]["kl"] += float(divergence(s_sel, t_sel).sum())
            sums[name]["agree"] += float((s_sel.argmax(-1) == t_sel[:, :vocab].argmax(-1)).sum())
            sums[name]["nll"] += float(torch.nn.functional.cross_entropy(s_sel, targets, reduction="sum"))
    if n_tokens == 0:
        raise UserError("val split has no target tokens to evaluate")
    return {name: {"kl_to_teacher": s["kl"] / n_tokens, "top1_agreement": s["agree"] / n_tokens,
                   "perplexity": math.exp(min(50.0, s["nll"] / n_tokens)), "tokens": n_tokens}
            for name, s in sums.items()}


def gate(cfg: Config, metrics: dict[str, float]) -> tuple[bool, list[str]]:
    """Thresholds from ``cfg.eval``; returns (passed, reasons for failing)."""
    reasons = []
    if not metrics["kl_to_teacher"] <= cfg.eval.max_kl_to_teacher:
        reasons.append(f"kl_to_teacher {metrics['kl_to_teacher']:.4f} > eval.max_kl_to_teacher "
                       f"{cfg.eval.max_kl_to_teacher}")
    if not metrics["perplexity"] <= cfg.eval.max_perplexity:
        reasons.append(f"perplexity {metrics['perplexity']:.2f} > eval.max_perplexity {cfg.eval.max_perplexity}")
    return not reasons, reasons


def run_merge_eval(cfg: Config, dataset_dir: str | Path, teacher_artifact: str | Path,
                   student_artifact: str | Path, distill_dir: str | Path, model_out: str | Path) -> dict:
    """Merge, evaluate, write ``eval.json`` and the model card into ``model_out``; returns eval dict."""
    t0 = time.time()
    model_out = Path(model_out)
    merged, tokenizer = merge(student_artifact, distill_dir, model_out)
    merged.eval()
    base = load_causal_lm(student_artifact, dtype=torch.float32).eval()
    teacher = load_causal_lm(teacher_artifact, dtype=torch.float32).eval()
    rows = read_split(dataset_dir, "val")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    table = fidelity({"base_student": base, "distilled": merged}, teacher, rows, pad_id,
                     cfg.eval.batch_size, cfg.eval.max_batches)
    passed, reasons = gate(cfg, table["distilled"])
    distill_card = read_card(distill_dir)
    result = {
        "kind": "eval",
        "fidelity": table,
        "metrics": table["distilled"],
        "gate": {"passed": passed, "reasons": reasons,
                 "thresholds": {"max_kl_to_teacher": cfg.eval.max_kl_to_teacher,
                                "max_perplexity": cfg.eval.max_perplexity}},
        "method": distill_card.get("method"),
        "teacher": read_card(teacher_artifact).get("source"),
        "student": read_card(student_artifact).get("source"),
        "dataset_hash": read_card(dataset_dir).get("dataset_hash"),
        "config_hash": cfg.hash(),
        "seconds": round(time.time() - t0, 2),
    }
    (model_out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    from llmneo.report import write_model_card, write_report

    log = Path(distill_dir) / "train_log.jsonl"
    write_report(model_out, result, log if log.is_file() else None, cfg)
    write_model_card(model_out, result, cfg)
    if (Path(distill_dir) / "train_log.jsonl").is_file():
        shutil.copy(Path(distill_dir) / "train_log.jsonl", model_out / "train_log.jsonl")
    write_card(model_out, {"kind": "model", "role": "distilled", **{k: result[k] for k in (
        "method", "teacher", "student", "dataset_hash", "config_hash")}, "metrics": result["metrics"],
        "seconds": result["seconds"]})
    return result
