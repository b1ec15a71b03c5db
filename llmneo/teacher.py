"""Teacher loading and verification; the base student (built, pruned from the teacher, or referenced).

    llmneo teacher --preset smollm2-demo --dataset runs/dbg/dataset --teacher-out runs/dbg/teacher \
        --student-out runs/dbg/student [teacher.mode=offline]

Outputs two model artifacts (folders): ``teacher`` and ``student``. Each holds the weights when this
step made them (tiny random-init, pruned) or only a card whose ``ref`` says where they are (a local
folder, ``smollm2``, ``hf:ID@COMMIT``, ``s3://…``), so an 8B teacher is never copied through the
artifact store. Sources (``teacher.source`` / ``student.source``): see :func:`llmneo.models.resolve_source`.

Verification, with one-line errors naming the field: the config loads; the parameter count of the
config (counted on the meta device, no weights loaded) equals the element count in the safetensors
headers; the tokenizer loads; teacher and student tokenizers are identical (vocabulary and special
tokens, else the first differences are listed); the dataset was tokenized with that tokenizer; the
teacher's vocabulary is at least the student's — a larger (padded) one is recorded as ``vocab_slice``:
the loss and the top-k cache use the first ``student vocab_size`` teacher logits.

With ``teacher.mode=offline`` the teacher's top-k log-probabilities over the train split are cached
in ``<teacher>/topk/`` (:mod:`llmneo.topk`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from llmneo import cards
from llmneo.cards import DatasetCard, ModelCard, ModelCards
from llmneo.config import Config
from llmneo.errors import UserError, first_line
from llmneo.models import (
    build_tiny_llama,
    build_tiny_tokenizer,
    folder_content_hash,
    load_causal_lm,
    meta_param_count,
    param_count,
    resolve_source,
    safetensors_summary,
    tokenizer_fingerprint,
)
from llmneo.report import table

SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8"}


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


def decoder_layers(model):
    """The ``nn.ModuleList`` of decoder blocks (Llama/Mistral/Qwen/SmolLM2 layout)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not hasattr(decoder, "layers"):
        raise UserError(f"student.source=prune: {type(model).__name__} has no decoder.layers to prune")
    return decoder


def prune_layers(model, keep: list[int]):
    """Depth-prune a decoder in place: keep only the given layer indices (ascending), renumbered.

    Embeddings, final norm and LM head are kept, so the pruned model keeps the teacher's tokenizer
    and vocabulary. Returns the model (``config.num_hidden_layers`` updated: it saves and reloads).
    """
    import torch

    decoder = decoder_layers(model)
    n = len(decoder.layers)
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep:
        raise UserError(f"student.prune_layers: indices must be in 0..{n - 1}, got {keep}")
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in keep])
    for new_idx, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def pruned_layer_indices(cfg: Config, num_layers: int) -> list[int]:
    """``student.prune_layers`` (negative = from the end) or every ``prune_keep_every``-th layer."""
    if not cfg.student.prune_layers:
        return list(range(0, num_layers, cfg.student.prune_keep_every))
    given = list(cfg.student.prune_layers)
    keep = [i + num_layers if i < 0 else i for i in given]
    bad = [g for g, i in zip(given, keep, strict=True) if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"student.prune_layers: {bad} out of range for a teacher with {num_layers} layers "
                        f"(0..{num_layers - 1}, or -{num_layers}..-1)")
    if len(set(keep)) != len(keep):
        raise UserError(f"student.prune_layers: repeated layers in {given}")
    if keep != sorted(keep):
        raise UserError(f"student.prune_layers: must be ascending (the layer order is kept), got {given}")
    return keep


def student_tokenizer(cfg: Config):
    """The tokenizer data prep encodes with: the student's (= the teacher's, verified later)."""
    if cfg.student.source == "tiny" or (cfg.student.source == "prune" and cfg.teacher.source == "tiny"):
        return build_tiny_tokenizer()
    if cfg.student.source == "prune":
        location, _ = resolve_source(cfg.teacher.source, "teacher.source")
        return _load_tokenizer(location, "teacher.source")
    location, _ = resolve_source(cfg.student.source, "student.source")
    return _load_tokenizer(location, "student.source")


# --------------------------------------------------------------------------------------------
# Describing and verifying a model
# --------------------------------------------------------------------------------------------


def _load_config(location: str, field: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location)
    except Exception as e:  # noqa: BLE001 - a broken or unknown config.json
        raise UserError(f"{field}: the model config at {location} does not load ({first_line(e)})") from None


def _load_tokenizer(location: str, field: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location)
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files
        raise UserError(f"{field}: the tokenizer at {location} does not load ({first_line(e)})") from None


def _describe(config, tokenizer, parameters: int, dtype: str) -> dict:
    return {"architecture": (config.architectures or [type(config).__name__])[0], "dtype": dtype,
            "parameters": parameters, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size, "tokenizer_size": len(tokenizer),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}


def _ref(source: str, location: str, revision: str | None) -> str:
    if source.startswith("hf:"):
        return f"{source.partition('@')[0]}@{revision}"  # pinned to the commit that was verified
    if source in ("smollm2",) or source.startswith("s3://"):
        return source  # resolved again (cache) wherever the artifact is used
    return location


def describe_reference(source: str, field: str, role: str) -> tuple[ModelCard, object]:
    """Verify a model given by reference without loading its weights; returns (card, tokenizer)."""
    location, revision = resolve_source(source, field)
    config = _load_config(location, field)
    tokenizer = _load_tokenizer(location, field)
    parameters, tied = meta_param_count(config)
    weights = safetensors_summary(location)
    if not weights["files"]:
        raise UserError(f"{field}: {source}: no *.safetensors weights in {location}")
    if weights["numel"] not in (parameters, parameters + tied):
        raise UserError(f"{field}: {source}: the safetensors files hold {weights['numel']:,} weights but the config "
                        f"describes {parameters:,} parameters (incomplete download or a mismatched config.json?)")
    dtype = "+".join(SAFETENSORS_DTYPES.get(d, d) for d in weights["dtypes"])
    card = ModelCard(role=role, source=source, ref=_ref(source, location, revision),
                     revision=revision or None,
                     content_hash=None if revision else folder_content_hash(location),
                     **_describe(config, tokenizer, parameters, dtype))
    return card, tokenizer


def save_model(model, tokenizer, out: Path, role: str, source: str, **extra) -> ModelCard:
    """Save weights + tokenizer into the artifact folder; returns its card (not yet written)."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return ModelCard(role=role, source=source, **extra, content_hash=folder_content_hash(out),
                     **_describe(model.config, tokenizer, param_count(model), dtype))


def check_vocabularies(teacher_card: ModelCard, student_card: ModelCard) -> dict | None:
    """KD compares distributions over the student's vocabulary: the teacher must cover it."""
    t, s = teacher_card.vocab_size, student_card.vocab_size
    n_tok = student_card.tokenizer_size
    for role, card in (("teacher", teacher_card), ("student", student_card)):
        if card.vocab_size < n_tok:
            raise UserError(f"{role}.source: vocab_size {card.vocab_size} is smaller than the tokenizer "
                            f"({n_tok} tokens): token ids would fall outside the embedding")
    if t < s:
        raise UserError(f"teacher vocabulary ({t}) is smaller than the student's ({s}): KD needs a teacher "
                        f"probability for every student token")
    if t > s:
        return {"teacher_vocab_size": t, "student_vocab_size": s,
                "note": f"teacher logits are sliced to the first {s} entries (loss and top-k cache)"}
    return None


def summary_table(models: dict[str, ModelCard]) -> str:
    rows = [[role, c.source, c.layers, f"{c.parameters / 1e6:.2f}M", c.dtype, c.vocab_size,
             c.tokenizer_fingerprint] for role, c in models.items()]
    return table(["model", "source", "layers", "params", "dtype", "vocab", "tokenizer"], rows, align_right=False)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def run_teacher(cfg: Config, dataset_dir: str | Path | None, teacher_out: str | Path,
                student_out: str | Path) -> ModelCards:
    """Materialize/verify teacher and base student (and the top-k cache); returns both cards, each
    also written (last) into its folder."""
    t0 = time.time()
    teacher_out, student_out = Path(teacher_out), Path(student_out)
    for out in (teacher_out, student_out):
        out.mkdir(parents=True, exist_ok=True)
        cards.remove(out)  # first: a failed re-run must not leave the previous run's cards
    # ---- teacher
    teacher_model = None
    if cfg.teacher.source == "tiny":
        tokenizer = build_tiny_tokenizer()
        teacher_model = build_tiny_llama(cfg.teacher.tiny, len(tokenizer), tokenizer.pad_token_id)
        teacher_card = save_model(teacher_model, tokenizer, teacher_out, "teacher", "tiny")
    else:
        teacher_card, tokenizer = describe_reference(cfg.teacher.source, "teacher.source", "teacher")

    def teacher_folder() -> Path:
        """Where the teacher's weights are (its card is written only at the end of the step)."""
        return teacher_out if teacher_model is not None else Path(resolve_source(teacher_card.ref)[0])

    # ---- student
    if cfg.student.source == "tiny":
        student = build_tiny_llama(cfg.student.tiny, len(tokenizer), tokenizer.pad_token_id)
        student_tok = tokenizer
        student_card = save_model(student, tokenizer, student_out, "student", "tiny")
    elif cfg.student.source == "prune":
        keep = pruned_layer_indices(cfg, teacher_card.layers)
        student = prune_layers(load_causal_lm(teacher_folder(), dtype="auto"), keep)
        student_tok = tokenizer
        student_card = save_model(student, tokenizer, student_out, "student", "prune",
                                  pruned_from=teacher_card.ref or cfg.teacher.source, kept_layers=keep)
        del student
    else:
        student_card, student_tok = describe_reference(cfg.student.source, "student.source", "student")

    # ---- verification: KD compares distributions token by token, so the vocabularies must match
    diffs = tokenizer_diff(tokenizer, student_tok)
    if diffs:
        raise UserError("teacher and student tokenizers differ: " + "; ".join(diffs))
    teacher_card.vocab_slice = check_vocabularies(teacher_card, student_card)
    data_card = DatasetCard.read(dataset_dir) if dataset_dir is not None else None
    data_fp = data_card.tokenizer_fingerprint if data_card else None
    if data_fp and data_fp != student_card.tokenizer_fingerprint:
        raise UserError(f"dataset {dataset_dir} was tokenized with tokenizer {data_fp}, the student uses "
                        f"{student_card.tokenizer_fingerprint}: re-run prep with this configuration")

    # ---- offline teacher: top-k log-probabilities over the train split, aligned to its rows
    if cfg.teacher.mode == "offline":
        if data_card is None:
            raise UserError("teacher.mode=offline needs the prepared dataset")
        from llmneo.topk import build_topk_cache

        teacher_card.topk = build_topk_cache(
            cfg, teacher_model if teacher_model is not None else teacher_folder(), dataset_dir,
            teacher_out / "topk", vocab_size=student_card.vocab_size,
            extra={"dataset_hash": data_card.dataset_hash, "teacher": teacher_card.ref or "tiny",
                   "tokenizer_fingerprint": teacher_card.tokenizer_fingerprint})

    teacher_card.seconds = student_card.seconds = round(time.time() - t0, 2)
    teacher_card.write(teacher_out)
    student_card.write(student_out)
    print(summary_table({"teacher": teacher_card, "student": student_card}), file=sys.stderr, flush=True)
    return ModelCards(teacher_card, student_card)
