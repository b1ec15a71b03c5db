"""Teacher loading and verification; the base student (built, pruned from the teacher, or referenced).

Outputs two model artifacts (folders): ``teacher`` and ``student``. Each holds the weights when this
step made them (tiny random-init, pruned) or only a card whose ``ref`` says where they are (a local
folder, the SmolLM2 cache, a hub id), so an 8B teacher is never copied through the artifact store.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmneo.config import Config
from llmneo.errors import UserError
from llmneo.models import (
    build_tiny_llama,
    build_tiny_tokenizer,
    load_causal_lm,
    load_tokenizer,
    model_location,
    param_count,
    resolve_source,
    tokenizer_fingerprint,
    write_card,
)


def tokenizer_diff(a, b, limit: int = 5) -> list[str]:
    """Human-readable first differences between two tokenizers (vocabulary and special tokens)."""
    diffs = []
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        diffs.append(f"vocabulary size {len(va)} vs {len(vb)}")
    for tok in sorted(set(va) ^ set(vb))[:limit]:
        diffs.append(f"token {tok!r} only in {'teacher' if tok in va else 'student'}")
    for tok in sorted(set(va) & set(vb)):
        if len(diffs) >= limit:
            break
        if va[tok] != vb[tok]:
            diffs.append(f"token {tok!r} has id {va[tok]} vs {vb[tok]}")
    for key in sorted(set(a.special_tokens_map) | set(b.special_tokens_map)):
        if a.special_tokens_map.get(key) != b.special_tokens_map.get(key):
            diffs.append(f"special token {key}: {a.special_tokens_map.get(key)!r} vs "
                         f"{b.special_tokens_map.get(key)!r}")
    return diffs[:limit]


def prune_layers(model, keep: list[int]):
    """Depth-prune a decoder in place: keep only the given layer indices (in order)."""
    import torch

    layers = model.model.layers
    n = len(layers)
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep:
        raise UserError(f"student.prune_layers: indices must be in 0..{n - 1}, got {keep}")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def pruned_layer_indices(cfg: Config, num_layers: int) -> list[int]:
    if cfg.student.prune_layers:
        return list(cfg.student.prune_layers)
    return list(range(0, num_layers, cfg.student.prune_keep_every))


def student_tokenizer(cfg: Config):
    """The tokenizer data prep encodes with: the student's (= the teacher's, verified later)."""
    if cfg.student.source == "tiny":
        return build_tiny_tokenizer()
    if cfg.student.source == "prune":
        if cfg.teacher.source == "tiny":
            return build_tiny_tokenizer()
        location, revision = resolve_source(cfg.teacher.source, "teacher.source")
    else:
        location, revision = resolve_source(cfg.student.source, "student.source")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, revision=revision)


def _describe(model, source: str, tokenizer) -> dict:
    return {"source": source, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "parameters": param_count(model), "layers": model.config.num_hidden_layers,
            "vocab_size": model.config.vocab_size, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}


def run_teacher(cfg: Config, teacher_out: str | Path, student_out: str | Path) -> dict:
    """Materialize/verify teacher and base student; returns a card with both descriptions."""
    t0 = time.time()
    teacher_out, student_out = Path(teacher_out), Path(student_out)
    # ---- teacher
    if cfg.teacher.source == "tiny":
        tokenizer = build_tiny_tokenizer()
        teacher = build_tiny_llama(cfg.teacher.tiny, len(tokenizer), tokenizer.pad_token_id)
        teacher.save_pretrained(teacher_out)
        tokenizer.save_pretrained(teacher_out)
        teacher_card = {"kind": "model", "role": "teacher"}
    else:
        location, revision = resolve_source(cfg.teacher.source, "teacher.source")
        tokenizer = load_tokenizer(location)
        teacher_card = {"kind": "model", "role": "teacher", "ref": location if not revision
                        else f"hf:{location}@{revision}"}
        write_card(teacher_out, teacher_card)
        teacher = load_causal_lm(teacher_out)
    teacher_card.update(_describe(teacher, cfg.teacher.source, tokenizer))

    # ---- student
    if cfg.student.source == "tiny":
        student = build_tiny_llama(cfg.student.tiny, len(tokenizer), tokenizer.pad_token_id)
        student_tok = tokenizer
        student.save_pretrained(student_out)
        student_tok.save_pretrained(student_out)
        student_card = {"kind": "model", "role": "student"}
    elif cfg.student.source == "prune":
        keep = pruned_layer_indices(cfg, teacher.config.num_hidden_layers)
        student = prune_layers(load_causal_lm(teacher_out), keep)
        student_tok = tokenizer
        student.save_pretrained(student_out)
        student_tok.save_pretrained(student_out)
        student_card = {"kind": "model", "role": "student", "pruned_from": cfg.teacher.source,
                        "kept_layers": keep}
    else:
        location, revision = resolve_source(cfg.student.source, "student.source")
        student_card = {"kind": "model", "role": "student",
                        "ref": location if not revision else f"hf:{location}@{revision}"}
        write_card(student_out, student_card)
        student = load_causal_lm(student_out)
        student_tok = load_tokenizer(model_location(student_out)[0])
    student_card.update(_describe(student, cfg.student.source, student_tok))

    # ---- verification: KD compares distributions token by token, so the vocabularies must match
    diffs = tokenizer_diff(tokenizer, student_tok)
    if diffs:
        raise UserError("teacher and student tokenizers differ: " + "; ".join(diffs))
    if teacher.config.vocab_size < student.config.vocab_size:
        raise UserError(f"teacher vocabulary ({teacher.config.vocab_size}) is smaller than the student's "
                        f"({student.config.vocab_size})")
    seconds = round(time.time() - t0, 2)
    teacher_card["seconds"] = student_card["seconds"] = seconds
    write_card(teacher_out, teacher_card)
    write_card(student_out, student_card)
    return {"teacher": teacher_card, "student": student_card, "seconds": seconds}
