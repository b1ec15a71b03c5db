"""Data-prep outputs: Parquet splits written row group by row group, packing, token statistics and
the length histogram, and the rejects log — each with memory bounded independently of the row count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from llmneo.data_sources import RecordError

IGNORE_INDEX = -100
ROW_GROUP_ROWS = 1024
HISTOGRAM = "length_histogram.png"


def _schema(packed: bool):
    import pyarrow as pa

    fields = [("row", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
    if packed:
        fields += [("position_ids", pa.list_(pa.int32())), ("rows", pa.list_(pa.int64()))]
    return pa.schema(fields)


class ParquetRows:
    """Append rows; a row group is written every ``ROW_GROUP_ROWS`` rows. The file appears under its
    final name only on :meth:`commit` (a failed step leaves no half-written split)."""

    def __init__(self, path: Path, packed: bool = False):
        import pyarrow.parquet as pq

        self.path, self.part = path, path.with_name(f".{path.name}.part")
        self.schema = _schema(packed)
        self.writer = pq.ParquetWriter(self.part, self.schema, compression="zstd")
        self.buffer: list[dict] = []
        self.rows = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        self.rows += 1
        if len(self.buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        self.part.replace(self.path)

    def abort(self) -> None:
        self.writer.close()
        self.part.unlink(missing_ok=True)


class Packer:
    """Greedy in-order packing of examples into rows of at most ``max_length`` tokens.

    Each packed row carries ``position_ids`` restarting at 0 for every example (the sequence
    boundaries) and ``rows`` (source rows, in order). The first label of every example is set to
    -100, so no position predicts across a boundary; the loss over a packed row equals the sum of
    the losses over its examples when attention does not cross boundaries (docs/data.md, "Packing").
    """

    def __init__(self, sink: ParquetRows, max_length: int):
        self.sink, self.max_length = sink, max_length
        self.examples = self.tokens = 0
        self._reset()

    def _reset(self) -> None:
        self.ids, self.labels, self.positions, self.rows = [], [], [], []

    def add(self, row: int, ids: list[int], labels: list[int]) -> None:
        if self.ids and len(self.ids) + len(ids) > self.max_length:
            self.flush()
        self.ids += ids
        self.labels += [IGNORE_INDEX] + labels[1:]
        self.positions += range(len(ids))
        self.rows.append(row)
        self.examples += 1
        self.tokens += len(ids)

    def flush(self) -> None:
        if self.ids:
            self.sink.add({"row": self.rows[0], "input_ids": self.ids, "labels": self.labels,
                           "position_ids": self.positions, "rows": self.rows})
            self._reset()


class TokenStats:
    """Length histogram (bounded by max_length, not by the number of rows) and token counts."""

    def __init__(self, max_length: int):
        self.lengths = np.zeros(max_length + 1, dtype=np.int64)
        self.label_tokens = 0
        self.loss_positions = {"train": 0, "val": 0}
        self.truncated = 0

    def add(self, ids: list[int], labels: list[int], split: str, truncated: bool) -> None:
        self.lengths[len(ids)] += 1
        n = sum(1 for t in labels if t != IGNORE_INDEX)
        self.label_tokens += n
        self.loss_positions[split] += n - (labels[0] != IGNORE_INDEX)
        self.truncated += truncated

    def summary(self) -> dict:
        n = int(self.lengths.sum())
        lengths = np.arange(len(self.lengths))
        total = int((lengths * self.lengths).sum())
        cdf = np.cumsum(self.lengths)

        def pct(q: float) -> int:
            return int(np.searchsorted(cdf, math.ceil(q * n)))

        nonzero = np.nonzero(self.lengths)[0]
        return {"total": total, "label_tokens": self.label_tokens, "mean_length": round(total / max(1, n), 2),
                "min_length": int(nonzero[0]) if n else 0, "max_length": int(nonzero[-1]) if n else 0,
                "p50_length": pct(0.5), "p90_length": pct(0.9), "p99_length": pct(0.99),
                "truncated": self.truncated, "loss_positions": dict(self.loss_positions)}

    def plot(self, path: Path, title: str, max_length: int) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        bins = min(64, max_length)
        edges = np.linspace(0, max_length + 1, bins + 1)
        counts = np.add.reduceat(self.lengths, np.floor(edges[:-1]).astype(int))
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4477aa")
        ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length={max_length}")
        ax.set_xlabel("tokens per example")
        ax.set_ylabel("examples")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class RejectLog:
    """Streams ``{"row", "reason", "kind"[, "where"]}`` lines to rejects.jsonl; counts per kind."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "w")
        self.by_kind: dict[str, int] = {}
        self.first: dict | None = None

    def add(self, row: int, error: RecordError, where: str | None) -> None:
        entry = {"row": row, "reason": str(error), "kind": error.kind}
        if where:
            entry["where"] = where
        self.f.write(json.dumps(entry) + "\n")
        self.by_kind[error.kind] = self.by_kind.get(error.kind, 0) + 1
        self.first = self.first or entry

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())

    def close(self) -> None:
        self.f.close()
