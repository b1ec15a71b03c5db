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
of the ``k`` most likely tokens, sorted by decreasing probability.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmneo.errors import UserError

META = "meta.json"
FORMAT = 1


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
        if sum(self._lengths) >= self.shard_tokens:
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
        self._ids, self._lps, self._lengths = [], [], []

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
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.meta["rows"]

    def _shard(self, row: int) -> tuple[int, dict]:
        for i, s in enumerate(self.meta["shards"]):
            if s["first_row"] <= row < s["first_row"] + s["rows"]:
                return i, s
        raise IndexError(f"row {row} not in the top-k cache ({len(self)} rows)")

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, s = self._shard(row)
        if i not in self._loaded:
            from safetensors.torch import load_file

            self._loaded = {i: load_file(str(self.dir / s["file"]))}  # keep one shard in memory
        t = self._loaded[i]
        lo, hi = int(t["offsets"][row - s["first_row"]]), int(t["offsets"][row - s["first_row"] + 1])
        return t["ids"][lo:hi].long(), t["logprobs"][lo:hi].float()
