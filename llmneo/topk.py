"""Offline teacher top-k logits: a cache aligned to the dataset rows (the contract between the
teacher step, which writes it, and the trainer, which reads it instead of loading a teacher).

Layout (inside the teacher artifact, ``topk/``)::

    meta.json                {"format": 1, "k", "vocab_size", "dtype", "split", "rows", "tokens",
                              "dataset_hash", "teacher", "shards": [{"file", "first_row", "rows", "tokens"}]}
    shard-00000.safetensors  ids [T, k] int32, logprobs [T, k] float16|bfloat16, offsets [rows+1] int64

Row ``r`` of the split (``train.parquet`` order) owns tokens ``offsets[r - first_row] :
offsets[r - first_row + 1]`` of its shard: one entry per next-token position that has a label
(``labels[t + 1] != -100``), in order — exactly the positions the loss uses
(:func:`llmneo.losses.shift_mask`). ``logprobs`` are the teacher's log-softmax values (temperature 1)
of the ``k`` most likely tokens, sorted by decreasing probability; with a teacher vocabulary padded
larger than the student's, over the first ``vocab_size`` (= student) logits only, as in the loss.

Written by :func:`build_topk_cache` (the teacher step with ``teacher.mode=offline``): one batched,
no-grad teacher pass over ``train.parquet``. Packed rows (``position_ids`` column) are run with those
position ids and no attention mask, so attention stays inside each example (docs/data.md, "Packing").

Reading for a micro-batch: ``cache.rows(indices)`` concatenates the rows' entries in order, which is
the order of ``hidden[:, :-1][shift_mask(labels)[0]]`` for the same rows — no re-alignment needed.
"""

from __future__ import annotations

import bisect
import json
import shutil
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

from llmneo.cards import DatasetCard
from llmneo.errors import UserError
from llmneo.heads import check_fast_paths, logits_head

META = "meta.json"
FORMAT = 1
OPEN_SHARDS = 16  # shard files a reader keeps open (memory-mapped)


class TopKWriter:
    """Append rows in dataset order; shards are flushed every ``shard_tokens`` positions."""

    def __init__(self, directory: str | Path, k: int, vocab_size: int, dtype: str = "float16",
                 split: str = "train", shard_tokens: int = 1 << 20, extra: dict | None = None):
        if dtype not in ("float16", "bfloat16"):
            raise UserError(f"teacher.topk_dtype: must be float16 or bfloat16, got {dtype!r}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.k, self.vocab_size, self.split = k, vocab_size, split
        self.dtype = getattr(torch, dtype)
        self.dtype_name = dtype
        self.shard_tokens = shard_tokens
        self.extra = extra or {}
        self.shards: list[dict] = []
        self.rows = self.tokens = 0
        self._buffered = 0
        self._ids: list[torch.Tensor] = []
        self._lps: list[torch.Tensor] = []
        self._lengths: list[int] = []
        self._first_row = 0

    def add(self, ids: torch.Tensor, logprobs: torch.Tensor) -> None:
        """One dataset row: ``ids`` and ``logprobs`` of shape ``[n_positions, k]``."""
        if ids.shape != logprobs.shape or ids.dim() != 2 or ids.shape[1] != self.k:
            raise ValueError(f"expected [n, {self.k}] ids and logprobs, got {tuple(ids.shape)}, "
                             f"{tuple(logprobs.shape)}")
        self._ids.append(ids.to(torch.int32).cpu())
        self._lps.append(logprobs.to(self.dtype).cpu())
        self._lengths.append(ids.shape[0])
        self.rows += 1
        self.tokens += ids.shape[0]
        self._buffered += ids.shape[0]
        if self._buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._lengths:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        offsets = torch.zeros(len(self._lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(self._lengths, dtype=torch.int64).cumsum(0)
        save_file({"ids": torch.cat(self._ids), "logprobs": torch.cat(self._lps), "offsets": offsets},
                  str(self.dir / name))
        self.shards.append({"file": name, "first_row": self._first_row, "rows": len(self._lengths),
                            "tokens": int(offsets[-1])})
        self._first_row += len(self._lengths)
        self._ids, self._lps, self._lengths, self._buffered = [], [], [], 0

    def close(self) -> dict:
        self._flush()
        meta = {"format": FORMAT, "k": self.k, "vocab_size": self.vocab_size, "dtype": self.dtype_name,
                "split": self.split, "rows": self.rows, "tokens": self.tokens, "shards": self.shards,
                "bytes": sum((self.dir / s["file"]).stat().st_size for s in self.shards), **self.extra}
        (self.dir / META).write_text(json.dumps(meta, indent=2) + "\n")  # written last: cache complete
        return meta


class TopKCache:
    """Read side: ``cache[row]`` → (ids ``[n, k]`` int64, logprobs ``[n, k]`` float32)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / META
        if not path.is_file():
            raise UserError(f"{self.dir}: no {META}; the top-k cache is missing or incomplete")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{path}: unsupported top-k cache format {self.meta.get('format')}")
        self.k = self.meta["k"]
        self.vocab_size = self.meta["vocab_size"]
        self._first_rows = [sh["first_row"] for sh in self.meta["shards"]]
        # open shards (memory-mapped, read by slice): shuffled access touches only the rows it needs
        self._open: OrderedDict[int, tuple] = OrderedDict()

    def __len__(self) -> int:
        return self.meta["rows"]

    def _shard(self, row: int) -> tuple:
        """(safetensors handle, offsets, first row) of the shard holding ``row``; the last
        ``OPEN_SHARDS`` shards stay open."""
        i = bisect.bisect_right(self._first_rows, row) - 1
        if not 0 <= row < len(self) or i < 0:
            raise IndexError(f"row {row} not in the top-k cache ({len(self)} rows)")
        if i in self._open:
            self._open.move_to_end(i)
        else:
            from safetensors import safe_open

            s = self.meta["shards"][i]
            handle = safe_open(str(self.dir / s["file"]), framework="pt")
            self._open[i] = (handle, handle.get_tensor("offsets"), s["first_row"])
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[i]

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        handle, offsets, first = self._shard(row)
        lo, hi = int(offsets[row - first]), int(offsets[row - first + 1])
        return handle.get_slice("ids")[lo:hi].long(), handle.get_slice("logprobs")[lo:hi].float()

    def rows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries of several rows, concatenated in the given order: ([N, k] ids, [N, k] logprobs)."""
        parts = [self[i] for i in indices]
        if not parts:
            return torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0, self.k)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# --------------------------------------------------------------------------------------------
# Building the cache: one teacher pass over the train split
# --------------------------------------------------------------------------------------------

SHARD_BYTES = 256 << 20  # ≈ bytes per shard (and the writer's buffer)
CHUNK_TOKENS = 1024  # positions per LM-head chunk: bounds fp32 logits memory to CHUNK_TOKENS × V × 4 B


@torch.no_grad()
def teacher_topk(teacher, batch: dict[str, torch.Tensor], k: int, vocab_size: int,
                 chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Top-k of the teacher's log-softmax at the loss positions of a batch.

    Returns ``ids [N, k]``, ``logprobs [N, k]`` (fp32) for the ``N`` positions ``t`` with
    ``labels[:, t+1] != -100`` in row-major order, and the number of such positions per row.
    """
    from llmneo.losses import shift_mask

    labels = batch["labels"]
    inputs = {k_: v for k_, v in batch.items() if k_ != "labels"}
    hidden = teacher.get_decoder()(**inputs, use_cache=False).last_hidden_state
    mask, _ = shift_mask(labels.to(hidden.device))
    selected = hidden[:, :-1][mask]
    head = logits_head(teacher)  # the teacher's own logits: soft-capped where it caps them
    ids, lps = [], []
    for chunk in selected.split(chunk_tokens):
        logp = torch.log_softmax(head(chunk)[:, :vocab_size].float(), dim=-1)
        values, indices = logp.topk(k, dim=-1)
        ids.append(indices)
        lps.append(values)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), mask.sum(1).tolist()
    return torch.cat(ids), torch.cat(lps), mask.sum(1).tolist()


def build_topk_cache(cfg, teacher, dataset_dir: str | Path, out_dir: str | Path, vocab_size: int,
                     extra: dict | None = None) -> dict:
    """Run the teacher over ``train.parquet`` and write the cache; prints its size and throughput.

    Args:
        cfg: the configuration (``teacher.topk``, ``topk_dtype``, ``topk_batch_size``, ``dtype``).
        teacher: a loaded model, or a teacher artifact folder to load it from.
        vocab_size: the student's vocabulary size (teacher logits beyond it are sliced off).
    Returns the cache's meta plus ``seconds``, ``positions_per_second``, ``device``.
    """
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from llmneo.data import collate, iter_split, split_path
    from llmneo.models import load_causal_lm, torch_dtype

    tcfg = cfg.teacher
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(tcfg.dtype, device.type)
    if not isinstance(teacher, torch.nn.Module):
        teacher = load_causal_lm(teacher, dtype=dtype)
    teacher = teacher.to(device=device, dtype=dtype).eval()
    card = DatasetCard.read(dataset_dir)
    check_fast_paths(teacher, "teacher", packed=bool(card.packing))  # its own logits (llmneo.heads), or refuse
    k = min(tcfg.topk, vocab_size)
    n_rows = pq.ParquetFile(split_path(dataset_dir, "train")).metadata.num_rows
    positions = card.loss_positions("train")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a stale or partial cache must not be mixed with this one
    out_dir.mkdir(parents=True)
    if positions:
        need, free = positions * k * 6, shutil.disk_usage(out_dir).free
        if need > free:
            raise UserError(f"teacher.topk={k}: the cache needs about {need / 2**30:.1f} GiB for {positions:,} "
                            f"positions, {free / 2**30:.1f} GiB free under {out_dir}; lower teacher.topk or data.limit")
    writer = TopKWriter(out_dir, k=k, vocab_size=vocab_size, dtype=tcfg.topk_dtype, split="train",
                        shard_tokens=max(4096, SHARD_BYTES // (k * 6)), extra=extra)
    pad_id = 0
    t0 = time.time()
    bar = tqdm(total=n_rows, desc=f"teacher top-{k}", unit=" rows", file=sys.stderr, mininterval=2.0)
    batch_rows: list[dict] = []

    def run(rows: list[dict]) -> None:
        batch = {name: t.to(device) for name, t in collate(rows, pad_id).items()}
        ids, lps, counts = teacher_topk(teacher, batch, k, vocab_size)
        for part_ids, part_lps in zip(ids.split(counts), lps.split(counts), strict=True):
            writer.add(part_ids, part_lps)
        bar.update(len(rows))

    for row in iter_split(dataset_dir, "train"):
        batch_rows.append(row)
        if len(batch_rows) == tcfg.topk_batch_size:
            run(batch_rows)
            batch_rows = []
    if batch_rows:
        run(batch_rows)
    bar.close()
    meta = writer.close()
    seconds = time.time() - t0
    summary = {key: meta[key] for key in ("k", "dtype", "vocab_size", "rows", "tokens", "bytes")}
    summary.update({"shards": len(meta["shards"]), "seconds": round(seconds, 2), "device": str(device),
                    "positions_per_second": round(meta["tokens"] / max(seconds, 1e-9), 1),
                    "path": "topk"})
    print(f"teacher top-k cache: {meta['rows']} rows, {meta['tokens']:,} positions, k={k} {meta['dtype']}: "
          f"{meta['bytes'] / 2**20:.1f} MiB in {seconds:.1f}s ({summary['positions_per_second']:,.0f} positions/s, "
          f"{meta['rows'] / max(seconds, 1e-9):.1f} rows/s, {device}) → {out_dir}", file=sys.stderr, flush=True)
    return summary
