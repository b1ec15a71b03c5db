"""A deterministic global shuffle with bounded memory, which also finds exact duplicates.

Every record gets a random sort key derived from its content and the seed,
``key = blake2b(digest, key=seed)`` with ``digest = blake2b(record)``, and the records are sorted by
``(key, row)`` with an external merge sort: up to ``buffer_bytes`` of records are sorted in memory
and spilled to a temporary Parquet "run"; the runs are then merged lazily (``heapq.merge``), reading
one small batch per run at a time. Peak memory is about ``buffer_bytes`` plus one batch per run,
whatever the number of records.

Why this order:

- the order is a uniformly random permutation that depends only on the seed and the records'
  contents — not on the buffer size, the number of runs, or the order of the input files;
- identical records get identical keys, so duplicates come out next to each other (the one with the
  lowest row first): deduplication needs to remember only the previous record's digest;
- taking the first N records gives a uniform sample, and the same seed gives nested samples
  (the 10k subset is inside the 100k subset).
"""

from __future__ import annotations

import hashlib
import heapq
import shutil
from collections.abc import Iterator
from pathlib import Path

RUN_ROW_GROUP = 256
ENTRY_OVERHEAD = 120  # bytes per buffered entry besides the record itself (tuple, ints, digest)

# (key, row, digest, where, blob): sorted by (key, row); rows are unique, so ties never reach digest
Entry = tuple[int, int, bytes, "str | None", bytes]


def record_digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


class ExternalShuffle:
    """``add`` records (canonical bytes) in any order; iterate to get them in shuffled order."""

    def __init__(self, workdir: str | Path, seed: int, buffer_bytes: int):
        self.workdir = Path(workdir)
        self.seed_key = seed.to_bytes(16, "big", signed=True)
        self.buffer_bytes = max(1, int(buffer_bytes))
        self.buffer: list[Entry] = []
        self.buffered = 0
        self.runs: list[Path] = []
        self.count = 0

    def add(self, row: int, blob: bytes, where: str | None = None) -> None:
        digest = record_digest(blob)
        key = int.from_bytes(hashlib.blake2b(digest, digest_size=8, key=self.seed_key).digest(), "big")
        self.buffer.append((key, row, digest, where, blob))
        self.buffered += len(blob) + ENTRY_OVERHEAD
        self.count += 1
        if self.buffered >= self.buffer_bytes:
            self._spill()

    def _spill(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffer:
            return
        self.buffer.sort(key=lambda e: (e[0], e[1]))
        key, row, digest, where, blob = zip(*self.buffer, strict=True)
        table = pa.table({"key": pa.array(key, pa.uint64()), "row": pa.array(row, pa.int64()),
                          "digest": pa.array(digest, pa.binary(16)), "where": pa.array(where, pa.string()),
                          "blob": pa.array(blob, pa.large_binary())})
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"run-{len(self.runs):05d}.parquet"
        pq.write_table(table, path, row_group_size=RUN_ROW_GROUP, compression="lz4")
        self.runs.append(path)
        self.buffer, self.buffered = [], 0

    def __iter__(self) -> Iterator[Entry]:
        if not self.runs:  # everything fit in memory: no disk round trip
            self.buffer.sort(key=lambda e: (e[0], e[1]))
            yield from self.buffer
            return
        self._spill()
        # one batch per run in memory; fewer rows per batch when there are many runs
        batch = max(16, min(RUN_ROW_GROUP, (1 << 16) // len(self.runs)))
        yield from heapq.merge(*(_read_run(p, batch) for p in self.runs))

    def cleanup(self) -> None:
        self.buffer = []
        if self.runs:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.runs = []


def _read_run(path: Path, batch_size: int) -> Iterator[Entry]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        cols = [batch.column(name).to_pylist() for name in ("key", "row", "digest", "where", "blob")]
        yield from zip(*cols, strict=True)
