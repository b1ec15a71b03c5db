"""A deterministic global shuffle with bounded memory, which also finds exact duplicates.

Every record gets a random sort key derived from its content and the seed,
``key = blake2b(digest, key=seed)`` with ``digest = blake2b(record)``, and the records are sorted by
``(key, row)`` with an external merge sort: up to ``buffer_bytes`` of records are sorted in memory
and spilled to a temporary Parquet "run" (row group by row group); at most ``MAX_FANIN`` runs are
merged at once (``heapq.merge``, one row group per run in memory) — more runs are first merged in
groups into longer runs. Peak memory is about ``buffer_bytes`` plus ``MAX_FANIN`` row groups of
``RUN_ROW_GROUP`` records, whatever the number of records.

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
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

RUN_ROW_GROUP = 256
MAX_FANIN = 16
ENTRY_OVERHEAD = 250  # bytes per buffered entry besides the record itself (tuple, ints, digest, list slot)

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
        self._next = 0
        shutil.rmtree(self.workdir, ignore_errors=True)  # runs left by an interrupted earlier prep

    def add(self, row: int, blob: bytes, where: str | None = None) -> None:
        digest = record_digest(blob)
        key = int.from_bytes(hashlib.blake2b(digest, digest_size=8, key=self.seed_key).digest(), "big")
        self.buffer.append((key, row, digest, where, blob))
        self.buffered += len(blob) + ENTRY_OVERHEAD
        self.count += 1
        if self.buffered >= self.buffer_bytes:
            self._spill()

    def _spill(self) -> None:
        if not self.buffer:
            return
        self.buffer.sort()  # by (key, row): rows are unique, so later fields never compare
        self.runs.append(self._write_run(self.buffer))
        self.buffer, self.buffered = [], 0

    def _write_run(self, entries) -> Path:
        """Write sorted entries to a new run file, one row group at a time (no full copy in Arrow)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("key", pa.uint64()), ("row", pa.int64()), ("digest", pa.binary(16)),
                            ("where", pa.string()), ("blob", pa.large_binary())])
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"run-{self._next:05d}.parquet"
        self._next += 1
        with pq.ParquetWriter(path, schema, compression="lz4") as writer:
            chunk = []
            for entry in itertools.chain(entries, [None]):
                if entry is not None:
                    chunk.append(entry)
                if len(chunk) == RUN_ROW_GROUP or (entry is None and chunk):
                    cols = list(zip(*chunk, strict=True))
                    writer.write_batch(pa.record_batch([pa.array(c, t.type) for c, t in zip(cols, schema, strict=True)],
                                                       schema=schema))
                    chunk = []
        return path

    def __iter__(self) -> Iterator[Entry]:
        if not self.runs:  # everything fit in memory: no disk round trip
            self.buffer.sort()  # by (key, row): rows are unique, so later fields never compare
            yield from self.buffer
            return
        self._spill()
        while len(self.runs) > MAX_FANIN:  # bound the merge's memory: merge groups into longer runs
            groups = [self.runs[i:i + MAX_FANIN] for i in range(0, len(self.runs), MAX_FANIN)]
            self.runs = []
            for group in groups:
                self.runs.append(self._write_run(heapq.merge(*(_read_run(p) for p in group))))
                for p in group:
                    p.unlink()
        yield from heapq.merge(*(_read_run(p) for p in self.runs))

    def cleanup(self) -> None:
        self.buffer, self.runs = [], []
        shutil.rmtree(self.workdir, ignore_errors=True)


def _read_run(path: Path) -> Iterator[Entry]:
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 16)  # no read-ahead: one row group
    for batch in reader.iter_batches(batch_size=RUN_ROW_GROUP, use_threads=False):
        cols = [batch.column(name).to_pylist() for name in ("key", "row", "digest", "where", "blob")]
        yield from zip(*cols, strict=True)
