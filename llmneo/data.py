"""Data prep: records → chat messages → token ids with response-only labels → train/val Parquet.

    llmneo prep --preset tiny --out runs/dbg/dataset data.source=my.jsonl data.limit=10000

Output folder (the ``dataset`` artifact)::

    train.parquet  val.parquet   columns: row (source row number), input_ids, labels (-100 = no loss);
                                 with data.packing, train rows also carry position_ids and rows
    rejects.jsonl                {"row", "reason", "kind"[, "where"]} for every record not kept
    card.json                    source, content hash, counts, token statistics, tokenizer fingerprint
    length_histogram.png         token lengths of the kept examples

Labels are *unshifted* (aligned with input_ids, Hugging Face convention); the loss shifts them.

How it streams (memory does not grow with the number of rows):

1. read: records are streamed from the source (:mod:`llmneo.data_sources`), normalized to chat
   messages and validated; bad ones go to ``rejects.jsonl`` at once; good ones, as canonical JSON,
   into an external shuffle (:mod:`llmneo.data_shuffle`, spills sorted runs to disk).
2. write: records come back in the seeded shuffled order, duplicates next to each other (dropped
   as rejects), are tokenized in batches and appended to ``val.parquet`` / ``train.parquet`` row
   group by row group. The kept record at position ``p`` of that order goes to val when
   ``ceil((p+1)·f) > ceil(p·f)`` (``f = data.val_fraction``): exactly ``ceil(n·f)`` val rows
   spread evenly over a random order, decided without knowing ``n`` in advance. ``data.limit``
   stops after that many kept rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from llmneo import cards
from llmneo.cards import DatasetCard
from llmneo.config import Config, DataConfig, result_fields
from llmneo.data_output import HISTOGRAM, IGNORE_INDEX, Packer, ParquetRows, RejectLog, TokenStats
from llmneo.data_shuffle import ExternalShuffle
from llmneo.data_sources import RecordError, open_source
from llmneo.errors import UserError
from llmneo.models import CHATML_TEMPLATE, tokenizer_fingerprint

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system", "bot": "assistant", "model": "assistant"}
ENCODE_BATCH = 256

__all__ = ["IGNORE_INDEX", "ChatRenderer", "RecordError", "detect_format", "to_conversation", "to_messages", "encode_batch",
           "read_split", "iter_split", "run_prep"]


# --------------------------------------------------------------------------------------------
# Formats → messages
# --------------------------------------------------------------------------------------------


def _present(rec: dict, key: str) -> bool:
    return rec.get(key) is not None


def detect_format(rec: dict) -> str:
    if _present(rec, "messages"):
        return "messages"
    if _present(rec, "conversations"):
        return "sharegpt"
    if _present(rec, "instruction") or _present(rec, "output"):
        return "alpaca"
    if _present(rec, "turns"):
        return "turns"
    if _present(rec, "prompt"):
        return "prompt"
    if _present(rec, "text"):
        return "text"
    raise RecordError("unknown format: expected one of the fields messages, conversations, "
                      "instruction/output, turns (MT-Bench questions), prompt, text", "unknown_format")


# What a record without answers lacks, and how to supply them (a record's reject reason)
PROMPT_ONLY_HINT = ("has no answers (prompt-only); set data.answers=teacher to have the teacher write them, or "
                    "give them (messages with assistant turns, instruction/output, prompt/completion)")


def _str_field(rec: dict, key: str, required: bool = True) -> str:
    if rec.get(key) is None:
        if required:
            raise RecordError(f"missing field {key!r}", "missing_field")
        return ""
    if not isinstance(rec[key], str):
        raise RecordError(f"field {key!r} must be a string, got {type(rec[key]).__name__}", "wrong_type")
    return rec[key]


def _content(value, where: str) -> str:
    """A turn's content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if value is None:
        raise RecordError(f"missing field {where}", "missing_field")
    raise RecordError(f"{where} must be a string, got {type(value).__name__}", "wrong_type")


def _user_turn(text: str, where: str) -> dict:
    if not text.strip():
        raise RecordError(f"empty field {where}", "empty")
    return {"role": "user", "content": text}


def _answer(rec: dict, key: str) -> dict:
    """An assistant turn from ``rec[key]``, or a placeholder (content None) when the field is absent."""
    return {"role": "assistant", "content": _str_field(rec, key, required=False) if rec.get(key) is not None
            else None}


def _alpaca(rec: dict) -> list[dict]:
    """instruction (+ input) → user, output → assistant; Alpaca's seed-task form ``instances: [{input,
    output}]`` gives one exchange per instance (the same instruction applied to each input)."""
    instruction = _str_field(rec, "instruction")
    instances = rec.get("instances")
    if instances is None or rec.get("output") is not None:
        instances = [rec]
    elif not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
        raise RecordError("field 'instances' must be a non-empty list of objects {input, output}", "wrong_type")
    messages = []
    for inst in instances:
        inp = _str_field(inst, "input", required=False)
        prompt = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        if not prompt.strip():
            raise RecordError("empty field 'instruction'", "empty")
        messages += [{"role": "user", "content": prompt}, _answer(inst, "output")]
    return messages


def to_conversation(rec: dict, fmt: str) -> list[dict] | str:
    """A record as chat messages ``[{"role", "content"}]`` (a plain string for ``text``) in which an
    answer the record lacks is a placeholder ``{"role": "assistant", "content": None}``.

    alpaca: instruction (+ input) → user, output → assistant (``instances``: one exchange each);
    messages: role/content; sharegpt: from/value (human/gpt/system, as in Infinity-Instruct); a
    conversation ending on a user turn gets a placeholder after it. turns (MT-Bench questions):
    every turn a user turn followed by a placeholder. prompt: a user turn, answered by ``completion``
    when present. An optional top-level ``system`` string becomes the system turn.
    """
    if fmt == "text":
        text = _str_field(rec, "text")
        if not text.strip():
            raise RecordError("empty field 'text'", "empty")
        return text
    system = _str_field(rec, "system", required=False)
    if fmt == "alpaca":
        messages = _alpaca(rec)
    elif fmt == "turns":
        turns = rec.get("turns")
        if turns is None:
            raise RecordError("missing field 'turns'", "missing_field")
        if not isinstance(turns, list) or not turns:
            raise RecordError("field 'turns' must be a non-empty list of strings", "wrong_type")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, str):
                raise RecordError(f"turns[{i}] must be a string, got {type(turn).__name__}", "wrong_type")
            messages += [_user_turn(turn, f"turns[{i}]"), {"role": "assistant", "content": None}]
    elif fmt == "prompt":
        messages = [_user_turn(_str_field(rec, "prompt"), "'prompt'"), _answer(rec, "completion")]
    else:
        key, role_key, content_key = (("messages", "role", "content") if fmt == "messages"
                                      else ("conversations", "from", "value"))
        turns = rec.get(key)
        if turns is None:
            raise RecordError(f"missing field {key!r}", "missing_field")
        if not isinstance(turns, list) or not turns:
            raise RecordError(f"field {key!r} must be a non-empty list", "wrong_type")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError(f"{key}[{i}] must be an object", "wrong_type")
            role = turn.get(role_key)
            if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
                raise RecordError(f"{key}[{i}].{role_key}: unknown role {role!r}", "unknown_role")
            content = _content(turn.get(content_key), f"{key}[{i}].{content_key}")
            messages.append({"role": ROLE_ALIASES[role.lower()], "content": content})
        if messages[-1]["role"] == "user":
            messages.append({"role": "assistant", "content": None})
    if system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def to_messages(rec: dict, fmt: str) -> list[dict] | str:
    """Normalize a record with its answers to chat messages (a plain string for ``text``): see
    :func:`to_conversation`. A record without any answer is rejected with what is missing and how to
    supply it (``data.answers=teacher``); a missing last answer after given ones is left out."""
    messages = to_conversation(rec, fmt)
    if isinstance(messages, str):
        return messages
    if messages[-1]["content"] is None and any(m["content"] is not None for m in messages
                                                if m["role"] == "assistant"):
        messages = messages[:-1]  # [user, assistant, user]: the trailing question is context, not trained
    responses = [m for m in messages if m["role"] == "assistant"]
    if not responses:
        raise RecordError("no assistant turn", "no_response")
    if any(m["content"] is None for m in responses):
        raise RecordError(f"record {PROMPT_ONLY_HINT}", "prompt_only")
    if any(not m["content"].strip() for m in responses):
        raise RecordError("empty response", "empty")
    return messages


# --------------------------------------------------------------------------------------------
# Tokenization with response-only labels
# --------------------------------------------------------------------------------------------


def resolve_chat_template(tokenizer, dcfg: DataConfig) -> str | None:
    """The Jinja chat template to render with: ``data.chat_template`` or the student tokenizer's."""
    if dcfg.chat_template == "chatml":
        return CHATML_TEMPLATE
    if dcfg.chat_template:
        return dcfg.chat_template
    return getattr(tokenizer, "chat_template", None) or None


class ChatRenderer:
    """Renders a conversation to text as ``apply_chat_template(..., tokenize=False)`` does (same
    compiled template, same variables: ``messages``, ``add_generation_prompt`` and the special
    tokens), without its per-call overhead, which dominated prep time (~0.5 ms per call)."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.variables = dict(tokenizer.special_tokens_map)
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.compiled = _compile_jinja_template(template)
        except ImportError:  # another transformers layout: fall back to the public API
            self.compiled = None

    def __call__(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.compiled is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template,
                                                      add_generation_prompt=add_generation_prompt)
        return self.compiled.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.variables)

    def with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text and the character spans of its assistant turns.

        A turn's span runs from the end of the prompt rendered for it (with the generation prompt)
        to the end of the conversation rendered up to and including it, so the end-of-turn token is
        trained as part of the response. Each prefix must render as a prefix of the whole.
        """
        try:
            full = self(messages, False)
            spans = []
            for i, msg in enumerate(messages):
                if msg["role"] != "assistant":
                    continue
                prompt = self(messages[:i], True)
                upto = full if i == len(messages) - 1 else self(messages[: i + 1], False)
                if not (upto.startswith(prompt) and full.startswith(upto)):
                    raise RecordError("chat template is not prefix-consistent for this conversation", "template")
                spans.append((len(prompt), len(upto)))
        except RecordError:
            raise
        except Exception as e:  # noqa: BLE001 - a Jinja error raised by the template for this record
            raise RecordError(f"chat template error: {str(e).splitlines()[0][:200]}", "template") from None
        return full, spans


def encode_batch(tokenizer, items: list[list[dict] | str], dcfg: DataConfig,
                 renderer: ChatRenderer | None) -> list[tuple[list[int], list[int], bool] | RecordError]:
    """Token ids, labels (unshifted; -100 where no loss) and a truncated flag per normalized record.

    Chat records are rendered with the template and tokenized in one batched call; a token is
    labelled when its characters overlap an assistant span (fast tokenizers' offset mapping). This
    equals tokenizing every prompt prefix separately (``tests/test_data.py`` checks it).
    """
    out: list = [None] * len(items)
    chat_idx, chat_texts, chat_spans, text_idx, text_texts = [], [], [], [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            text_idx.append(i)
            text_texts.append(item)
            continue
        if renderer is None:
            out[i] = RecordError("the student tokenizer has no chat template (set data.chat_template, "
                                 "or use data.format=text)", "template")
            continue
        try:
            text, spans = renderer.with_spans(item)
        except RecordError as e:
            out[i] = e
            continue
        chat_idx.append(i)
        chat_texts.append(text)
        chat_spans.append(spans)
    if chat_texts:
        enc = tokenizer(chat_texts, add_special_tokens=False, return_offsets_mapping=True)
        for i, ids, offsets, spans in zip(chat_idx, enc["input_ids"], enc["offset_mapping"], chat_spans,
                                          strict=True):
            if dcfg.assistant_only_labels:
                off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
                in_span = np.zeros(len(ids), dtype=bool)
                for lo, hi in spans:
                    in_span |= (off[:, 1] > lo) & (off[:, 0] < hi)
                labels = np.where(in_span, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
            else:
                labels = list(ids)
            out[i] = _fit(list(ids), labels, dcfg)
    if text_texts:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for i, ids in zip(text_idx, tokenizer(text_texts, add_special_tokens=False)["input_ids"], strict=True):
            ids = list(ids) + eos
            out[i] = _fit(ids, list(ids), dcfg)
    return out


def _fit(ids: list[int], labels: list[int], dcfg: DataConfig):
    truncated = len(ids) > dcfg.max_length
    if truncated:
        if dcfg.truncation == "drop":
            return RecordError(f"too long: {len(ids)} tokens > data.max_length={dcfg.max_length}", "too_long")
        ids, labels = ids[: dcfg.max_length], labels[: dcfg.max_length]
    if all(t == IGNORE_INDEX for t in labels[1:]):
        return RecordError("no response tokens left after truncation" if truncated
                           else "no response tokens", "no_labels")
    return ids, labels, truncated


def _dedup(entries, rejects: RejectLog, enabled: bool):
    """Drop an entry whose digest equals the previous one's (the shuffle puts duplicates together)."""
    prev_digest, prev_row = None, None
    for _key, row, digest, where, blob in entries:
        if enabled and digest == prev_digest:
            rejects.add(row, RecordError(f"exact duplicate of row {prev_row}", "duplicate"), where)
            continue
        prev_digest, prev_row = digest, row
        yield row, where, blob


# --------------------------------------------------------------------------------------------
# Reading the output (small data; the trainer and the top-k pass stream with iter_split)
# --------------------------------------------------------------------------------------------


def split_path(dataset_dir: str | Path, split: str) -> Path:
    path = Path(dataset_dir) / f"{split}.parquet"
    if not path.is_file():
        raise UserError(f"dataset {dataset_dir}: missing {split}.parquet")
    return path


def read_split(dataset_dir: str | Path, split: str) -> list[dict]:
    """All rows of train/val as dicts with Python lists."""
    import pyarrow.parquet as pq

    return pq.read_table(split_path(dataset_dir, split)).to_pylist()


def iter_split(dataset_dir: str | Path, split: str, batch_rows: int = 1024) -> Iterator[dict]:
    """Rows of train/val in file order, one row group at a time (flat memory)."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(split_path(dataset_dir, split)).iter_batches(batch_size=batch_rows):
        yield from batch.to_pylist()


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded batch ``[B, max_len]`` of ``input_ids`` and ``labels`` (-100 on padding) — the one
    batching used by the trainer, the top-k pass and evaluation.

    Plain rows get an ``attention_mask``. Packed rows (a ``position_ids`` column, see
    docs/data.md, "Packing") get their ``position_ids`` and no mask, the padding continuing as a segment of its own
    (positions from 0): from restarting positions transformers builds a block-diagonal causal mask, so
    no token attends across examples.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    packed = "position_ids" in rows[0]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        if packed:
            extra[i, :n] = torch.tensor(r["position_ids"])
            extra[i, n:] = torch.arange(width - n)
        else:
            extra[i, :n] = 1
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _is_val(position: int, fraction: Fraction) -> bool:
    return math.ceil((position + 1) * fraction) > math.ceil(position * fraction)


def run_prep(cfg: Config, tokenizer, out_dir: str | Path, answers_dir: str | Path | None = None) -> DatasetCard:
    """Prepare ``cfg.data`` into ``out_dir``; returns the card (also written, last, as card.json).

    ``answers_dir``: the generate step's folder; when it holds the teacher's answers they are read
    instead of ``data.source`` (the card keeps ``data.source`` and records the generation)."""
    from tqdm import tqdm

    t0 = time.time()
    dcfg = cfg.data
    generated = None
    if answers_dir is not None:
        from llmneo.cards import AnswersCard

        answers = AnswersCard.read(answers_dir)
        if answers.generated:
            generated = {"answers": answers.answers, "generation_key": answers.generation_key,
                         "teacher": answers.teacher, "generation": answers.generation,
                         "counts": answers.counts, "rejected_by_kind": answers.rejected_by_kind,
                         "samples": answers.samples}
            dcfg = dataclasses.replace(dcfg, source=str(Path(answers_dir) / "answers.jsonl"), format="messages")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cards.remove(out)  # first: a failed re-run must not leave the previous run's card (= "complete")
    for stale in ("train.parquet", "val.parquet", HISTOGRAM):
        (out / stale).unlink(missing_ok=True)
    template = resolve_chat_template(tokenizer, dcfg)
    renderer = ChatRenderer(tokenizer, template) if template else None
    rejects = RejectLog(out / "rejects.jsonl")
    shuffle = ExternalShuffle(out / ".prep-runs", dcfg.seed, int(dcfg.buffer_mb * 2**20))
    formats: dict[str, int] = {}
    n_read = 0
    writers: list[ParquetRows] = []
    try:
        # ---- pass 1: read, normalize, validate; good records into the external shuffle
        with open_source(dcfg) as source:
            bar = tqdm(source.records(), desc="prep: read", unit=" rows", mininterval=2.0, leave=False)
            for row, rec, err, where in bar:
                n_read += 1
                try:
                    if err is not None:
                        raise err
                    fmt = detect_format(rec) if dcfg.format == "auto" else dcfg.format
                    messages = to_messages(rec, fmt)
                except RecordError as e:
                    rejects.add(row, e, where)
                    continue
                formats[fmt] = formats.get(fmt, 0) + 1
                shuffle.add(row, json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode(), where)
            bar.close()
            content_hash, source_info = source.content_hash, dict(source.info)
        if n_read == 0:
            raise UserError(f"data.source {dcfg.source}: no records")
        if shuffle.count == 0:
            rejects.close()
            first = rejects.first
            raise UserError(f"data.source {dcfg.source}: all {n_read} rows rejected (first: row {first['row']}: "
                            f"{first['reason']}; see {rejects.path})")

        # ---- pass 2: shuffled order → dedup → tokenize → val/train Parquet
        val_w = ParquetRows(out / "val.parquet")
        train_w = ParquetRows(out / "train.parquet", packed=dcfg.packing)
        writers = [val_w, train_w]
        packer = Packer(train_w, dcfg.max_length) if dcfg.packing else None
        stats = TokenStats(dcfg.max_length)
        fraction = Fraction(dcfg.val_fraction).limit_denominator(1_000_000)
        kept = seen = 0
        bar = tqdm(total=dcfg.limit or shuffle.count, desc="prep: tokenize", unit=" rows", mininterval=2.0,
                   leave=False)
        entries = _dedup(shuffle, rejects, dcfg.dedup)
        while True:
            # with a limit, never take more entries than could still be kept: the kept rows are then
            # exactly the first `limit` valid ones of the shuffled order (nested across limits)
            want = min(ENCODE_BATCH, dcfg.limit - kept) if dcfg.limit else ENCODE_BATCH
            batch = list(itertools.islice(entries, want)) if want > 0 else []
            if not batch:
                break
            encoded = encode_batch(tokenizer, [json.loads(blob) for _, _, blob in batch], dcfg, renderer)
            for (row, where, _), result in zip(batch, encoded, strict=True):
                seen += 1
                if isinstance(result, RecordError):
                    rejects.add(row, result, where)
                    continue
                ids, labels, truncated = result
                split = "val" if _is_val(kept, fraction) else "train"
                stats.add(ids, labels, split, truncated)
                kept += 1
                if split == "val":
                    val_w.add({"row": row, "input_ids": ids, "labels": labels})
                elif packer:
                    packer.add(row, ids, labels)
                else:
                    train_w.add({"row": row, "input_ids": ids, "labels": labels})
            bar.update(len(batch))
        bar.close()
        if packer:
            packer.flush()
        rejects.close()
        if kept == 0:
            first = rejects.first
            raise UserError(f"data.source {dcfg.source}: all {n_read} rows rejected (first: row {first['row']}: "
                            f"{first['reason']}; see {rejects.path})")
        if kept < dcfg.min_rows:
            raise UserError(f"data.source {dcfg.source}: only {kept} valid rows, data.min_rows={dcfg.min_rows} "
                            f"({rejects.count} rejected; see {rejects.path})")
        if train_w.rows == 0:
            raise UserError(f"data.source {dcfg.source}: all {kept} valid rows went to val "
                            f"(data.val_fraction={dcfg.val_fraction}); at least 2 rows are needed")
        for w in writers:
            w.commit()
        writers = []
    finally:
        for w in writers:
            w.abort()
        if not rejects.f.closed:
            rejects.close()
        shuffle.cleanup()

    seconds = time.time() - t0
    tokens = stats.summary()
    stats.plot(out / HISTOGRAM, f"{cfg.data.source}: {kept} examples, mean {tokens['mean_length']} tokens", dcfg.max_length)
    if generated is not None:
        source_info = {**source_info, "generated": generated}
    card = DatasetCard(
        source=cfg.data.source,
        source_info=source_info,
        content_hash=content_hash,
        formats=formats,
        # rows the limit left unread are neither kept nor rejected
        counts={"read": n_read, "rejected": rejects.count, "kept": kept, "train": train_w.rows,
                "val": val_w.rows, "beyond_limit": shuffle.count - seen - rejects.by_kind.get("duplicate", 0)},
        rejected_by_kind=dict(sorted(rejects.by_kind.items())),
        tokens=tokens,
        packing=({"train_examples": packer.examples, "train_rows": train_w.rows,
                  "fill": round(packer.tokens / max(1, train_w.rows * dcfg.max_length), 4)}
                 if packer else None),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        chat_template_hash=hashlib.sha256((template or "").encode()).hexdigest()[:16],
        max_length=dcfg.max_length,
        seed=dcfg.seed,
        histogram=HISTOGRAM,
        seconds=round(seconds, 2),
        rows_per_second=round(n_read / max(seconds, 1e-9), 1),
    )
    # the dataset hash identifies the prepared data (lineage): source bytes + what was done to them
    # not the location (same bytes elsewhere = same data) nor buffer_mb (same output whatever its value)
    recipe = {k: v for k, v in result_fields(dcfg).items() if k != "source"}
    card.dataset_hash = hashlib.sha256(
        json.dumps([content_hash, recipe, card.tokenizer_fingerprint, card.chat_template_hash],
                   sort_keys=True).encode()).hexdigest()[:16]
    return card.write(out)
