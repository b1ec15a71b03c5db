"""Data prep: records → chat messages → token ids with response-only labels → train/val Parquet.

Output folder (the ``dataset`` artifact)::

    train.parquet  val.parquet   columns: row (source row number), input_ids, labels (-100 = no loss)
    rejects.jsonl                {"row": N, "reason": "..."} for every record not kept
    card.json                    source, content hash, counts, token statistics, tokenizer fingerprint

Labels are *unshifted* (aligned with input_ids, Hugging Face convention); the loss shifts them.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

from llmneo.config import Config, DataConfig
from llmneo.errors import UserError
from llmneo.models import builtin_path, tokenizer_fingerprint, write_card

IGNORE_INDEX = -100
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system", "bot": "assistant", "model": "assistant"}


class RecordError(ValueError):
    """A record that cannot be used; the message becomes its reason in rejects.jsonl."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def source_path(source: str) -> Path:
    if source.startswith("builtin:"):
        return builtin_path(source.removeprefix("builtin:"))
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.source: {source!r} does not exist")
    return path


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number from 1, record or None, error or None) for each non-blank line."""
    with open(path, "rb") as f:
        for row, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield row, None, f"undecodable bytes: {e.reason} at byte {e.start}"
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                yield row, None, f"invalid JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(rec, dict):
                yield row, None, f"record is a JSON {type(rec).__name__}, expected an object"
                continue
            yield row, rec, None


# --------------------------------------------------------------------------------------------
# Formats → messages
# --------------------------------------------------------------------------------------------


def detect_format(rec: dict) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    raise RecordError("unknown format: expected one of the fields messages, conversations, "
                      "instruction/output, text")


def _str_field(rec: dict, key: str, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise RecordError(f"missing field {key!r}")
        return ""
    if not isinstance(rec[key], str):
        raise RecordError(f"field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def to_messages(rec: dict, fmt: str) -> list[dict] | str:
    """Normalize a record to chat messages (or a plain string for the ``text`` format)."""
    if fmt == "text":
        text = _str_field(rec, "text")
        if not text.strip():
            raise RecordError("empty field 'text'")
        return text
    if fmt == "alpaca":
        instruction, inp = _str_field(rec, "instruction"), _str_field(rec, "input", required=False)
        output = _str_field(rec, "output")
        prompt = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        if not prompt.strip():
            raise RecordError("empty field 'instruction'")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        key, role_key, content_key = (("messages", "role", "content") if fmt == "messages"
                                      else ("conversations", "from", "value"))
        turns = rec.get(key)
        if not isinstance(turns, list) or not turns:
            raise RecordError(f"field {key!r} must be a non-empty list")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError(f"{key}[{i}] must be an object")
            role, content = turn.get(role_key), turn.get(content_key)
            if role not in ROLE_ALIASES:
                raise RecordError(f"{key}[{i}].{role_key}: unknown role {role!r}")
            if not isinstance(content, str):
                raise RecordError(f"{key}[{i}].{content_key} must be a string")
            messages.append({"role": ROLE_ALIASES[role], "content": content})
    responses = [m for m in messages if m["role"] == "assistant"]
    if not responses:
        raise RecordError("no assistant turn")
    if any(not m["content"].strip() for m in responses):
        raise RecordError("empty response")
    return messages


# --------------------------------------------------------------------------------------------
# Tokenization with response-only labels
# --------------------------------------------------------------------------------------------


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode(tokenizer, messages: list[dict] | str, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Token ids and labels (unshifted; -100 where no loss) for one normalized record."""
    if isinstance(messages, str):
        ids = tokenizer(messages, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        ids, labels = [], []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prefix = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
            full = _chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
                raise RecordError("chat template is not prefix-consistent for this conversation")
            labels += [IGNORE_INDEX] * (len(prefix) - len(ids)) + full[len(prefix):]
            ids = full
        if not cfg.assistant_only_labels:
            labels = list(ids)
    if len(ids) > cfg.max_length:
        if cfg.truncation == "drop":
            raise RecordError(f"too long: {len(ids)} tokens > data.max_length={cfg.max_length}")
        ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
    if sum(1 for t in labels[1:] if t != IGNORE_INDEX) == 0:
        raise RecordError("no response tokens left after truncation")
    return ids, labels


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("row", pa.int64()), ("input_ids", pa.list_(pa.int32())),
                        ("labels", pa.list_(pa.int32()))])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)


def read_split(dataset_dir: str | Path, split: str) -> list[dict]:
    """Rows of train/val as dicts with python lists (small data; the trainer streams larger)."""
    import pyarrow.parquet as pq

    path = Path(dataset_dir) / f"{split}.parquet"
    if not path.is_file():
        raise UserError(f"dataset {dataset_dir}: missing {split}.parquet")
    return pq.read_table(path).to_pylist()


def run_prep(cfg: Config, tokenizer, out_dir: str | Path) -> dict:
    """Prepare ``cfg.data`` into ``out_dir``; returns the card (also written as card.json)."""
    t0 = time.time()
    dcfg = cfg.data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = source_path(dcfg.source)
    content_hash = hashlib.sha256(path.read_bytes()).hexdigest()

    kept, rejects, seen = [], [], set()
    fmt_counts: dict[str, int] = {}
    n_read = 0
    for row, rec, err in iter_jsonl(path):
        n_read += 1
        try:
            if err:
                raise RecordError(err)
            fmt = detect_format(rec) if dcfg.format == "auto" else dcfg.format
            messages = to_messages(rec, fmt)
            if dcfg.dedup:
                key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
                if key in seen:
                    raise RecordError("exact duplicate of an earlier record")
                seen.add(key)
            ids, labels = encode(tokenizer, messages, dcfg)
        except RecordError as e:
            rejects.append({"row": row, "reason": str(e)})
            continue
        fmt_counts[fmt] = fmt_counts.get(fmt, 0) + 1
        kept.append({"row": row, "input_ids": ids, "labels": labels})

    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    if not kept:
        raise UserError(f"data.source {dcfg.source}: all {n_read} rows rejected "
                        f"(first: row {rejects[0]['row']}: {rejects[0]['reason']}; see {out / 'rejects.jsonl'})"
                        if rejects else f"data.source {dcfg.source}: no rows")
    random.Random(dcfg.seed).shuffle(kept)
    if dcfg.limit:
        kept = kept[: dcfg.limit]
    if len(kept) < dcfg.min_rows:
        raise UserError(f"data.source {dcfg.source}: only {len(kept)} valid rows, data.min_rows={dcfg.min_rows} "
                        f"({len(rejects)} rejected; see {out / 'rejects.jsonl'})")
    n_val = min(len(kept) - 1, max(1, round(len(kept) * dcfg.val_fraction)))
    val, train = kept[:n_val], kept[n_val:]
    _write_parquet(out / "train.parquet", train)
    _write_parquet(out / "val.parquet", val)

    lengths = [len(r["input_ids"]) for r in kept]
    card = {
        "kind": "dataset",
        "source": dcfg.source,
        "content_hash": content_hash,
        "formats": fmt_counts,
        "counts": {"read": n_read, "kept": len(kept), "rejected": len(rejects), "train": len(train),
                   "val": len(val)},
        "tokens": {"total": sum(lengths), "mean_length": round(sum(lengths) / len(lengths), 2),
                   "max_length": max(lengths),
                   "label_tokens": sum(sum(1 for t in r["labels"] if t != IGNORE_INDEX) for r in kept)},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "max_length": dcfg.max_length,
        "seconds": round(time.time() - t0, 2),
    }
    # the dataset hash identifies the prepared data (lineage): source bytes + what was done to them
    card["dataset_hash"] = hashlib.sha256(
        json.dumps([content_hash, dcfg.__dict__, card["tokenizer_fingerprint"]], sort_keys=True).encode()
    ).hexdigest()[:16]
    return write_card(out, card)
