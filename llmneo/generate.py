"""Teacher-written answers: prompt-only records answered by the teacher (sequence-level distillation).

    llmneo generate --preset smollm2-demo --out runs/dbg/answers data.source=questions.jsonl data.answers=teacher

Runs before prep when ``data.answers`` is ``missing`` (answer the records that lack answers) or
``teacher`` (the teacher writes every assistant turn; given ones are replaced). With ``given`` (the
default) it only writes a card saying so, and prep reads ``data.source`` itself.

Output folder (the ``answers`` artifact)::

    answers.jsonl   {"messages": [...], "row": N} per kept record, in source order
    rejects.jsonl   {"row", "reason", "kind"[, "where"]}: records not usable, truncated or empty answers
    card.json       AnswersCard: teacher fingerprint, every generation parameter, counts, samples

How it runs:

1. read: records are streamed from ``data.source`` (:mod:`llmneo.data_sources`) and normalized to
   conversations whose missing answers are placeholders (:func:`llmneo.data.to_conversation`);
   bad records go to the rejects.
2. key: the answers depend on the source's content, the teacher's fingerprint, the chat template and
   the generation parameters; their digest (``generation_key``) names a work folder under
   ``$LLMNEO_CACHE/generated/`` (on the pipeline's cache volume in a cluster).
3. generate: the records are cut into shards of ``generate.shard_prompts``; each finished shard is
   written atomically with a marker holding its SHA-256. A shard already in the work folder is
   reused: a second run with the same inputs generates nothing, a killed run resumes after its last
   finished shard, and another teacher or parameter gives another key, so everything is generated
   again. Multi-turn records are answered turn by turn, each turn seeing the teacher's earlier
   answers. An answer that reaches ``generate.max_new_tokens`` without the end of its turn
   (``truncated``) or that is empty (``empty_answer``) rejects its record.
4. assemble: the shards are concatenated into ``answers.jsonl``; the card is written last.

Generation goes through one seam, :class:`Generator` (a list of conversations and a seed in, texts
out); :class:`TransformersGenerator` implements it with transformers' ``generate``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmneo import cards
from llmneo.cards import AnswersCard
from llmneo.config import Config, result_fields
from llmneo.data import ChatRenderer, detect_format, resolve_chat_template, to_conversation
from llmneo.data_output import RejectLog
from llmneo.data_sources import RecordError, open_source
from llmneo.errors import UserError
from llmneo.models import cache_dir

ANSWERS = "answers.jsonl"
REJECTS = "rejects.jsonl"
SAMPLE_CHARS = 400  # per turn in the card's samples


# --------------------------------------------------------------------------------------------
# The generation seam
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One answer: its text, its new tokens (the end-of-turn token included) and whether it ended on
    an end-of-turn token (False: cut by max_new_tokens)."""

    text: str
    new_tokens: int
    finished: bool


class Generator(Protocol):
    """Answers the last (user) turn of each conversation. ``seed`` makes sampling reproducible: equal
    inputs and seed give equal outputs. ``batch_size`` is what the engine batches (for the card)."""

    batch_size: int

    def generate(self, conversations: list[list[dict]], seed: int) -> list[Generation]: ...


class TransformersGenerator:
    """:class:`Generator` on transformers' ``generate``: chat template with the generation prompt,
    left-padded batches of similar lengths, greedy (``temperature`` 0) or sampled (temperature, top-p),
    stop on the model's end-of-turn/EOS tokens."""

    def __init__(self, model, tokenizer, template: str, gcfg, batch_size: int,
                 stop_token_ids: list[int] | None = None):
        import torch
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.progress: Callable[[int, int], None] | None = None  # (prompts, new tokens) after each batch
        self.renderer = ChatRenderer(tokenizer, template)
        self.device = next(model.parameters()).device
        self.stop = set(stop_token_ids if stop_token_ids is not None else _stop_tokens(model, tokenizer))
        if not self.stop:
            raise UserError("teacher: no end-of-sequence token (tokenizer eos_token / generation_config."
                            "eos_token_id): generated answers could never end")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop)
        sample = gcfg.temperature > 0
        # a full configuration: the model's own defaults (repetition penalty, sampling) do not apply
        self.config = GenerationConfig(max_new_tokens=gcfg.max_new_tokens, do_sample=sample,
                                       temperature=gcfg.temperature if sample else None,
                                       top_p=gcfg.top_p if sample else None, top_k=None,
                                       eos_token_id=sorted(self.stop), pad_token_id=self.pad)
        self.torch = torch

    def prompt_ids(self, conversation: list[dict]) -> list[int]:
        text = self.renderer(conversation, True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: list[list[dict]], seed: int) -> list[Generation]:
        torch = self.torch
        prompts = [self.prompt_ids(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # similar lengths together
        out: list[Generation | None] = [None] * len(prompts)
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(prompts[i])
                ids[row, width - n:] = torch.tensor(prompts[i])
                mask[row, width - n:] = 1
            torch.manual_seed(_derive(seed, b))
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=self.config)
            for row, i in enumerate(idx):
                new = gen[row, width:].tolist()
                end = next((k for k, t in enumerate(new) if t in self.stop), None)
                kept = new if end is None else new[:end]
                text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
                out[i] = Generation(text, len(kept) + (end is not None), end is not None)
            if self.progress is not None:
                self.progress(len(idx), sum(out[i].new_tokens for i in idx))
        return out  # type: ignore[return-value]


def _stop_tokens(model, tokenizer) -> list[int]:
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def _derive(*parts: int) -> int:
    """A 63-bit seed from integers (shard and batch seeds from generate.seed)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big") >> 1


def auto_batch_size(model, gcfg, max_prompt_tokens: int) -> int:
    """``generate.batch_size`` 0: 8 on CPU; on CUDA as many sequences as half the free memory holds
    in KV cache at the longest prompt plus ``max_new_tokens``."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return 8
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(256, free * 0.5 // (per_token * (max_prompt_tokens + gcfg.max_new_tokens)))))


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------


def teacher_fingerprint(cfg: Config) -> dict:
    """What identifies the teacher's weights without loading them: a tiny teacher's shape and seed;
    a hub commit; else the SHA-256 manifest of the weights folder."""
    from llmneo.models import folder_content_hash, resolve_source

    source = cfg.teacher.source
    if source == "tiny":
        blob = json.dumps(result_fields(cfg.teacher.tiny), sort_keys=True).encode()
        return {"source": source, "fingerprint": "tiny:" + hashlib.sha256(blob).hexdigest()[:16]}
    location, revision = resolve_source(source, "teacher.source")
    if revision:
        return {"source": source, "fingerprint": f"{source.partition('@')[0]}@{revision}"}
    return {"source": source, "fingerprint": folder_content_hash(location)[:16]}


def load_teacher_for_generation(cfg: Config):
    """(model in eval mode on the GPU when there is one, tokenizer) of ``teacher.source``."""
    import torch

    from llmneo.models import (
        build_tiny_llama,
        build_tiny_tokenizer,
        load_causal_lm,
        resolve_source,
        torch_dtype,
    )
    from llmneo.teacher import _load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.teacher.source == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_llama(cfg.teacher.tiny, len(tokenizer), tokenizer.pad_token_id)
    else:
        location, _ = resolve_source(cfg.teacher.source, "teacher.source")
        tokenizer = _load_tokenizer(location, "teacher.source")
        model = load_causal_lm(location, dtype=torch_dtype(cfg.teacher.dtype, device))
    return model.to(device).eval(), tokenizer


def _teacher_template(tokenizer, cfg: Config) -> str:
    """The teacher answers in its own chat format; ``data.chat_template`` when it has none."""
    template = getattr(tokenizer, "chat_template", None) or resolve_chat_template(tokenizer, cfg.data)
    if not template:
        raise UserError("teacher.source: the teacher tokenizer has no chat template to write answers with "
                        "(set data.chat_template, e.g. chatml)")
    return template


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _placeholders(messages: list[dict], mode: str) -> list[dict]:
    """``teacher``: every assistant turn is written by the teacher (given ones are dropped)."""
    if mode == "teacher":
        return [{"role": "assistant", "content": None} if m["role"] == "assistant" else m for m in messages]
    return messages


def _pending(messages: list[dict]) -> int | None:
    return next((i for i, m in enumerate(messages) if m["content"] is None), None)


def _read_records(cfg: Config, tmp: Path, rejects: RejectLog) -> tuple[int, int, dict, str, dict]:
    """Pass 1: the source's usable records, one JSON line each ``{row, where, messages}`` in ``tmp``.
    Returns (read, kept, formats, content hash, source info)."""
    dcfg, gcfg = cfg.data, cfg.generate
    read = kept = 0
    formats: dict[str, int] = {}
    with open_source(dcfg) as source, open(tmp, "w") as f:
        for row, rec, err, where in source.records():
            if gcfg.max_prompts and kept >= gcfg.max_prompts:
                continue  # read on: the content hash covers the whole source
            read += 1
            try:
                if err is not None:
                    raise err
                fmt = detect_format(rec) if dcfg.format == "auto" else dcfg.format
                messages = to_conversation(rec, fmt)
                if isinstance(messages, str):
                    if dcfg.answers == "teacher":
                        raise RecordError("a text record has no prompt for the teacher to answer", "no_prompt")
                else:
                    messages = _placeholders(messages, dcfg.answers)
                    if _pending(messages) is None and any(not m["content"].strip() for m in messages
                                                           if m["role"] == "assistant"):
                        raise RecordError("empty response", "empty")
            except RecordError as e:
                rejects.add(row, e, where)
                continue
            formats[fmt] = formats.get(fmt, 0) + 1
            kept += 1
            f.write(json.dumps({"row": row, "where": where, "messages": messages}, ensure_ascii=False) + "\n")
        return read, kept, formats, source.content_hash, dict(source.info)


def _shards(path: Path, size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    with open(path) as f:
        for line in f:
            batch.append(json.loads(line))
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# Shards: written atomically with a marker, verified before reuse
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard_paths(work: Path, index: int) -> tuple[Path, Path, Path]:
    stem = f"shard-{index:05d}"
    return work / f"{stem}.jsonl", work / f"{stem}.rejects.jsonl", work / f"{stem}.done.json"


def _finished_shard(work: Path, index: int, key: str) -> dict | None:
    """The marker of a shard finished for ``key`` whose files still hash as recorded, else None."""
    answers, rejects, marker = _shard_paths(work, index)
    try:
        done = json.loads(marker.read_text())
        if (isinstance(done, dict) and done.get("key") == key and _sha256(answers) == done.get("answers_sha256")
                and _sha256(rejects) == done.get("rejects_sha256")):
            return done
    except (OSError, ValueError):
        pass
    return None


def _answer_shard(records: list[dict], generator: Generator, seed: int, max_prompt_tokens: int | None,
                  prompt_len: Callable[[list[dict]], int] | None, progress) -> tuple[list[dict], list[dict], dict]:
    """Answer every placeholder of ``records``, turn by turn (round r answers each record's r-th
    missing answer, seeing its earlier answers). Returns (kept records, rejects, stats)."""
    active = [r for r in records if _pending(r["messages"]) is not None]
    rejected: dict[int, RecordError] = {}
    stats = {"answers": 0, "new_tokens": 0, "answered": len(active)}
    rnd = 0
    while active:
        todo = []
        for r in active:
            i = _pending(r["messages"])
            prefix = r["messages"][:i]
            if max_prompt_tokens is not None and prompt_len is not None and prompt_len(prefix) >= max_prompt_tokens:
                rejected[r["row"]] = RecordError(
                    f"prompt of {prompt_len(prefix)} tokens leaves no room for an answer within "
                    f"data.max_length={max_prompt_tokens}", "too_long")
                continue
            todo.append((r, i, prefix))
        results = generator.generate([p for _, _, p in todo], _derive(seed, rnd)) if todo else []
        for (r, i, _), g in zip(todo, results, strict=True):
            stats["new_tokens"] += g.new_tokens
            if not g.finished:
                rejected[r["row"]] = RecordError(
                    f"truncated answer (turn {sum(m['role'] == 'assistant' for m in r['messages'][:i]) + 1}): "
                    f"{g.new_tokens} tokens without the end of the turn (generate.max_new_tokens)", "truncated")
            elif not g.text:
                rejected[r["row"]] = RecordError("empty answer from the teacher", "empty_answer")
            else:
                r["messages"][i] = {"role": "assistant", "content": g.text}
                stats["answers"] += 1
        progress(len(todo), sum(g.new_tokens for g in results))
        active = [r for r in active if r["row"] not in rejected and _pending(r["messages"]) is not None]
        rnd += 1
    kept = [{"messages": r["messages"], "row": r["row"]} for r in records if r["row"] not in rejected]
    rejects = [{"row": r["row"], "reason": str(rejected[r["row"]]), "kind": rejected[r["row"]].kind,
                **({"where": r["where"]} if r.get("where") else {})} for r in records if r["row"] in rejected]
    return kept, rejects, stats


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def generation_parameters(cfg: Config, template: str | None) -> dict:
    """Every parameter the answers depend on (recorded in the card, part of the key)."""
    g = cfg.generate
    return {"engine": g.engine, "max_new_tokens": g.max_new_tokens, "temperature": g.temperature,
            "top_p": g.top_p if g.temperature > 0 else None, "seed": g.seed if g.temperature > 0 else None,
            "batch_size": g.batch_size or "auto", "shard_prompts": g.shard_prompts, "max_prompts": g.max_prompts,
            "answers": cfg.data.answers, "format": cfg.data.format, "max_length": cfg.data.max_length,
            "chat_template_hash": hashlib.sha256((template or "").encode()).hexdigest()[:16]}


def work_root() -> Path:
    """Where shards are kept between runs (reuse, resume): ``$LLMNEO_CACHE/generated``."""
    return cache_dir() / "generated"


def run_generate(cfg: Config, out_dir: str | Path,
                 make_generator: Callable[[], Generator] | None = None) -> AnswersCard:
    """Write the teacher's answers for ``cfg.data`` into ``out_dir``; returns the card (written last).

    ``make_generator`` replaces the teacher's :class:`TransformersGenerator` (another engine)."""
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cards.remove(out)
    for stale in (ANSWERS, REJECTS):
        (out / stale).unlink(missing_ok=True)
    if cfg.data.answers == "given":
        return AnswersCard(answers="given", source=cfg.data.source,
                           seconds=round(time.time() - t0, 2)).write(out)

    rejects = RejectLog(out / REJECTS)
    records = out / ".records.jsonl"
    try:
        read, kept, formats, content_hash, source_info = _read_records(cfg, records, rejects)
        if read == 0:
            raise UserError(f"data.source {cfg.data.source}: no records")
        if kept == 0:
            rejects.close()
            raise UserError(f"data.source {cfg.data.source}: all {read} rows rejected (first: row "
                            f"{rejects.first['row']}: {rejects.first['reason']}; see {rejects.path})")
        teacher = teacher_fingerprint(cfg)
        state: dict = {}

        def generator() -> Generator:  # the teacher is loaded only when a shard must be generated
            if "g" not in state:
                if make_generator is not None:
                    state["g"] = make_generator()
                else:
                    model, tokenizer = load_teacher_for_generation(cfg)
                    batch = cfg.generate.batch_size or auto_batch_size(model, cfg.generate, cfg.data.max_length)
                    state["g"] = TransformersGenerator(model, tokenizer, state["template"], cfg.generate, batch)
            return state["g"]

        # the template is part of the key: read it from the tokenizer only (no weights loaded)
        state["template"] = _template_for(cfg)
        params = generation_parameters(cfg, state["template"])
        key = hashlib.sha256(json.dumps({"content_hash": content_hash, "source_info": source_info,
                                         "teacher": teacher["fingerprint"], "generation": params},
                                        sort_keys=True, default=str).encode()).hexdigest()[:20]
        work = work_root() / key
        work.mkdir(parents=True, exist_ok=True)
        totals = {"answers": 0, "new_tokens": 0, "answered": 0, "reused": 0, "generated": 0, "gen_seconds": 0.0,
                  "gen_prompts": 0}
        n_shards = -(-kept // cfg.generate.shard_prompts)
        bar = _progress(kept)
        prompt_len = None
        for index, shard in enumerate(_shards(records, cfg.generate.shard_prompts)):
            done = _finished_shard(work, index, key)
            if done is None:
                g = generator()
                if prompt_len is None and isinstance(g, TransformersGenerator):
                    prompt_len = lambda prefix, g=g: len(g.prompt_ids(prefix))  # noqa: E731
                    g.progress = bar.update_tokens  # per batch: a long round does not look stuck
                t1 = time.time()
                per_round = bar.update_tokens if getattr(g, "progress", None) is None else (lambda n, t: None)
                answered, shard_rejects, stats = _answer_shard(shard, g, _derive(cfg.generate.seed, index),
                                                               cfg.data.max_length, prompt_len, per_round)
                answers_path, rejects_path, marker = _shard_paths(work, index)
                _atomic_write(answers_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answered))
                _atomic_write(rejects_path, "".join(json.dumps(r) + "\n" for r in shard_rejects))
                done = {"key": key, "index": index, "records": len(shard), **stats,
                        "answers_sha256": _sha256(answers_path), "rejects_sha256": _sha256(rejects_path)}
                _atomic_write(marker, json.dumps(done, sort_keys=True) + "\n")
                totals["generated"] += 1
                bar.skip(done)
                totals["gen_seconds"] += time.time() - t1
                totals["gen_prompts"] += stats["answered"]
                totals["new_tokens"] += stats["new_tokens"]
            else:
                totals["reused"] += 1
                bar.skip(done)
            totals["answers"] += done["answers"]
            totals["answered"] += done["answered"]
        bar.close()

        # ---- assemble: answers.jsonl in source order; rejects: pass 1's, then the shards'
        kept_rows = 0
        with open(out / ANSWERS, "w") as f:
            for index in range(n_shards):
                answers_path, rejects_path, _ = _shard_paths(work, index)
                with open(answers_path) as shard:
                    for line in shard:
                        f.write(line)
                        kept_rows += 1
                with open(rejects_path) as shard:
                    for line in shard:
                        entry = json.loads(line)
                        rejects.add(entry["row"], RecordError(entry["reason"], entry["kind"]), entry.get("where"))
        rejects.close()
    finally:
        if not rejects.f.closed:
            rejects.close()
        records.unlink(missing_ok=True)
    if kept_rows == 0:
        first = rejects.first
        raise UserError(f"data.source {cfg.data.source}: no record kept after generation (first reject: row "
                        f"{first['row']}: {first['reason']}; see {rejects.path})")

    seconds = time.time() - t0
    gen_seconds = max(totals["gen_seconds"], 1e-9)
    card = AnswersCard(
        answers=cfg.data.answers, source=cfg.data.source, source_info=source_info, content_hash=content_hash,
        formats=formats,
        counts={"read": read, "rejected": rejects.count, "kept": kept_rows, "answered": totals["answered"],
                "passed_through": kept - totals["answered"]},
        rejected_by_kind=dict(sorted(rejects.by_kind.items())),
        teacher=teacher, generation={**params, "batch_size_used": getattr(state.get("g"), "batch_size", None)},
        generation_key=key, shards={"total": n_shards, "reused": totals["reused"], "generated": totals["generated"]},
        answers_generated=totals["answers"], new_tokens=totals["new_tokens"], seconds=round(seconds, 2),
        prompts_per_second=round(totals["gen_prompts"] / gen_seconds, 2) if totals["generated"] else 0.0,
        tokens_per_second=round(totals["new_tokens"] / gen_seconds, 1) if totals["generated"] else 0.0,
        samples=_samples(out / ANSWERS, cfg.generate.samples),
        answers_hash=_sha256(out / ANSWERS),
    )
    for s in card.samples:
        print(f"generate: row {s['row']}: " + " | ".join(f"{m['role']}: {m['content'][:120]!r}"
                                                        for m in s["messages"]), file=sys.stderr)
    return card.write(out)


def _template_for(cfg: Config) -> str:
    if cfg.teacher.source == "tiny":
        from llmneo.models import build_tiny_tokenizer

        return _teacher_template(build_tiny_tokenizer(), cfg)
    from llmneo.models import resolve_source
    from llmneo.teacher import _load_tokenizer

    location, _ = resolve_source(cfg.teacher.source, "teacher.source")
    return _teacher_template(_load_tokenizer(location, "teacher.source"), cfg)


def _samples(path: Path, n: int) -> list[dict]:
    """The first ``n`` records of answers.jsonl that hold a teacher answer, turns cut to SAMPLE_CHARS."""
    out = []
    with open(path) as f:
        for line in f:
            if len(out) >= n:
                break
            rec = json.loads(line)
            out.append({"row": rec["row"], "messages": [
                {"role": m["role"], "content": m["content"][:SAMPLE_CHARS] + ("…" if len(m["content"]) > SAMPLE_CHARS
                                                                              else "")}
                for m in rec["messages"]]})
    return out


class _progress:
    """tqdm over records with prompts/s and tokens/s of the generated shards (reused ones are skipped)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="generate", unit=" records", mininterval=2.0, leave=False)
        self.t0, self.prompts, self.tokens = time.time(), 0, 0

    def update_tokens(self, prompts: int, tokens: int) -> None:
        self.prompts += prompts
        self.tokens += tokens
        dt = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.prompts / dt:.3g} prompts/s, {self.tokens / dt:.0f} tok/s", refresh=False)
        self.bar.refresh()

    def skip(self, done: dict) -> None:
        self.bar.update(done["records"])

    def close(self) -> None:
        self.bar.close()

