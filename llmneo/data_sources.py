"""Data-prep sources: every kind of input becomes one stream of raw records, read with flat memory.

    with open_source(cfg.data) as source:          # downloads s3:// into a temp folder, removed after
        for row, record, error, where in source.records():
            ...                                    # record: dict, or None with error: RecordError
        source.content_hash                        # complete once records() is exhausted

Sources (``data.source``):

- ``builtin:NAME`` — a JSONL file shipped in ``llmneo/assets``;
- a ``.jsonl`` / ``.json`` / ``.parquet`` file, or a folder of them (read recursively, sorted by path);
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``: ``data.split``);
- ``hf:ID[@REVISION]`` — ``datasets.load_dataset`` (``data.subset``, ``data.split``); offline it loads
  from the local datasets cache (``HF_DATASETS_CACHE``);
- ``s3://bucket/prefix`` (a folder) or ``s3://bucket/key.jsonl`` (one object), downloaded with SHA-256
  verification (where the store kept a checksum) through :mod:`llmneo.storage`.

Row numbers start at 1 and count positions in the source: for JSONL the line number (blank lines are
skipped but counted), for JSON arrays / Parquet / datasets the record index; across the files of a
folder they continue, and ``where`` names ``file:row-in-file`` for rejects. ``content_hash`` is the
sha256 of the file's bytes (one file; equal to ``sha256sum``), of a ``sha256sum``-style manifest of
the files (folders), or of the canonical JSON of every record (datasets).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmneo.errors import UserError, first_line
from llmneo.storage import download_prefix, open_object, safe_path

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
READ_CHUNK = 1 << 20
BATCH_ROWS = 1024


class RecordError(ValueError):
    """A record that cannot be used; the message is its reason in rejects.jsonl, ``kind`` its class."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


# (row, record or None, error or None, where) — ``where`` is "file:row" for multi-file sources
RawRecord = tuple[int, "dict | None", "RecordError | None", "str | None"]


@dataclass
class Source:
    """Where records come from; ``records()`` streams them and fills ``content_hash`` at the end."""

    name: str
    kind: str  # file | folder | hf_disk | hf_hub
    files: list[Path] = field(default_factory=list)
    root: Path | None = None
    dataset: Any = None
    info: dict = field(default_factory=dict)
    content_hash: str = ""

    def records(self) -> Iterator[RawRecord]:
        if self.dataset is not None:
            yield from _dataset_records(self)
            return
        manifest = hashlib.sha256()
        offset = 0
        for path in self.files:
            label = path.relative_to(self.root).as_posix() if self.kind == "folder" else None
            hasher = hashlib.sha256()
            last = 0
            for pos, rec, err in _file_records(path, hasher):
                last = pos
                yield offset + pos, rec, err, f"{label}:{pos}" if label else None
            offset += last
            manifest.update(f"{hasher.hexdigest()}  {label or path.name}\n".encode())
            if self.kind == "file":
                self.content_hash = hasher.hexdigest()
        if self.kind == "folder":
            self.content_hash = manifest.hexdigest()


# --------------------------------------------------------------------------------------------
# Opening a source
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_source(dcfg) -> Iterator[Source]:
    """Resolve ``dcfg.source`` (a :class:`llmneo.config.DataConfig`) into a :class:`Source`."""
    source = dcfg.source
    if not source.strip():  # Path("") is the working directory: it would read every JSON file in it
        raise UserError("data.source: empty; give builtin:NAME, a file or folder, hf:ID or s3://bucket/prefix")
    if source.startswith("s3://"):
        tmp = Path(tempfile.mkdtemp(prefix="llmneo-s3-data-"))
        try:
            local = _download_s3(source, tmp)
            src = _local_source(local, dcfg, name=source)
            src.info["s3_uri"] = source
            yield src
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if source.startswith("hf:"):
        yield _hub_source(source, dcfg)
        return
    if source.startswith("builtin:"):
        from llmneo.models import builtin_path

        yield Source(source, "file", files=[builtin_path(source.removeprefix("builtin:"))])
        return
    path = Path(source).expanduser()
    if not path.exists():
        hint = (f"; for a Hugging Face dataset write hf:{source}"
                if source.count("/") == 1 and not source.startswith((".", "/", "~")) else "")
        raise UserError(f"data.source: {source!r} does not exist{hint}")
    yield _local_source(path, dcfg, name=source)


def _local_source(path: Path, dcfg, name: str) -> Source:
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise UserError(f"data.source: {path.name}: unsupported file type (expected "
                            f"{', '.join(FILE_SUFFIXES)})")
        return Source(name, "file", files=[path])
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _disk_dataset_source(path, dcfg, name)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(f"data.source: {name}: no {', '.join(FILE_SUFFIXES)} files in this folder")
    return Source(name, "folder", files=files, root=path)


def _disk_dataset_source(path: Path, dcfg, name: str) -> Source:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here is a broken user folder
        raise UserError(f"data.source: {name}: cannot load the saved dataset ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if dcfg.split not in ds:
            raise UserError(f"data.split: {dcfg.split!r} is not a split of {name} (splits: {', '.join(ds)})")
        ds = ds[dcfg.split]
    return Source(name, "hf_disk", dataset=ds, info={"fingerprint": ds._fingerprint, "split": dcfg.split})


def _hub_source(source: str, dcfg) -> Source:
    import datasets

    repo_id, _, revision = source[3:].partition("@")
    if not repo_id:
        raise UserError(f"data.source: empty dataset id in {source!r} (expected hf:ID[@REVISION])")
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline:
        _probe_hub(source, repo_id, revision or None)
    try:
        ds = datasets.load_dataset(repo_id, dcfg.subset or None, split=dcfg.split, revision=revision or None)
    except ValueError as e:
        raise UserError(f"data.source: {source}: {first_line(e)} (data.subset={dcfg.subset!r}, "
                        f"data.split={dcfg.split!r})") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not available"
        hint = (" — offline mode is on and it is not in the local datasets cache (load it once online, or "
                "save it with save_to_disk and point data.source at that folder)" if offline else "")
        raise UserError(f"data.source: cannot load {source} ({first_line(e)}){hint}") from None
    return Source(source, "hf_hub", dataset=ds, info={"fingerprint": ds._fingerprint, "split": dcfg.split,
                                                      "subset": dcfg.subset, "revision": revision or None})


HUB_PROBE_TIMEOUT_S = 10


def _probe_hub(source: str, repo_id: str, revision: str | None) -> None:
    """One request for the dataset's info before ``load_dataset``: a missing dataset, a missing
    revision or an unreachable hub is one line in seconds (``load_dataset`` retries an unreachable
    hub five times with backoff, printing a line each time, before failing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise UserError(f"data.source: {source}: a gated dataset; accept its terms on the Hub and set "
                        f"HF_TOKEN") from None
    except RevisionNotFoundError:
        raise UserError(f"data.source: {source}: revision {revision!r} does not exist") from None
    except RepositoryNotFoundError:
        raise UserError(f"data.source: {source}: no such dataset on the Hub (or a private one: set "
                        f"HF_TOKEN)") from None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS failure, timeout, proxy errors
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise UserError(f"data.source: {source}: the Hugging Face Hub ({endpoint}) is unreachable "
                        f"({first_line(e)}); check the network or proxy, or use a local copy (a folder "
                        f"saved with save_to_disk, or the datasets cache with HF_HUB_OFFLINE=1)") from None


def _download_s3(uri: str, dest: Path) -> Path:
    """One object (``s3://b/x.jsonl``) or every object under a prefix, into ``dest``."""
    has_key = "/" in uri.partition("://")[2].strip("/")  # s3://bucket/key, not a bare bucket
    label = f"data.source: {uri}"
    if has_key and Path(uri).suffix in FILE_SUFFIXES and not uri.endswith("/"):
        store, name = open_object(uri, label)
        return store.get_file(name, safe_path(name, dest, uri))
    download_prefix(uri, dest, label)
    return dest


# --------------------------------------------------------------------------------------------
# Readers: (position in file from 1, record or None, error or None)
# --------------------------------------------------------------------------------------------


def _file_records(path: Path, hasher) -> Iterator[tuple[int, dict | None, RecordError | None]]:
    if path.suffix == ".parquet":
        yield from _parquet_records(path, hasher)
    elif path.suffix == ".json" and _first_char(path) == "[":
        yield from _json_array_records(path, hasher)
    else:  # .jsonl, or a .json file holding JSON Lines (as datasets' json loader accepts)
        yield from _jsonl_records(path, hasher)


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip().lstrip(codecs.BOM_UTF8)
            if stripped:
                return chr(stripped[0])
    return ""


def _check_object(rec: Any) -> tuple[dict | None, RecordError | None]:
    if not isinstance(rec, dict):
        return None, RecordError(f"record is a JSON {type(rec).__name__}, expected an object", "not_object")
    return rec, None


def _jsonl_records(path: Path, hasher):
    with open(path, "rb") as f:
        for pos, raw in enumerate(f, start=1):
            hasher.update(raw)
            if pos == 1:  # a UTF-8 byte-order mark (Windows editors) is not part of the first record
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield pos, None, RecordError(f"undecodable bytes: {e.reason} at byte {e.start}", "undecodable")
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                yield pos, None, RecordError(f"invalid JSON: {e.msg} (column {e.colno})", "invalid_json")
                continue
            yield (pos, *_check_object(rec))


def _json_array_records(path: Path, hasher):
    """Elements of a top-level JSON array, decoded incrementally (one element in memory at a time).

    A syntax error inside an array cannot be skipped (the next element's start is unknown), so it
    fails the file with its position instead of rejecting one record.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    buf, pos, count, eof, started = "", 0, 0, False, False

    def fail(msg: str):
        raise UserError(f"data.source: {path.name}: {msg} after record {count}; a JSON array cannot be "
                        f"read past a syntax error (JSON Lines can: one record per line)")

    with open(path, "rb") as f:
        def more() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(READ_CHUNK)
            hasher.update(chunk)
            try:
                text = utf8.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                fail(f"undecodable bytes ({e.reason})")
            buf, pos = buf[pos:] + text, 0
            eof = not chunk
            return bool(chunk)

        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos == len(buf):
                if not more():
                    fail("unexpected end of file")
                continue
            ch = buf[pos]
            if not started:
                if ch != "[":
                    fail("expected '['")
                started, pos = True, pos + 1
                continue
            if ch == "]":
                while more():  # hash the rest of the file
                    pass
                return
            if ch == "," and count:
                pos += 1
                continue
            try:
                rec, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof and more():
                    continue
                fail(f"invalid JSON ({e.msg})")
            if end == len(buf) and not eof:  # a value cut by the chunk boundary: read on, retry
                more()
                continue
            pos = end
            count += 1
            yield (count, *_check_object(rec))


def _parquet_records(path: Path, hasher):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
    try:
        pf = pq.ParquetFile(path)
        pos = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for rec in batch.to_pylist():
                pos += 1
                yield pos, rec, None
    except (OSError, pa.ArrowException) as e:  # a corrupt or truncated file
        raise UserError(f"data.source: {path.name}: not a readable Parquet file ({first_line(e)})") from None


def _canonical(rec: dict) -> bytes:
    return json.dumps(rec, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def _dataset_records(source: Source):
    hasher = hashlib.sha256()
    pos = 0
    for batch in source.dataset.iter(batch_size=BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            pos += 1
            rec = dict(zip(columns, values, strict=True))
            hasher.update(_canonical(rec) + b"\n")
            yield pos, rec, None, None
    source.content_hash = hasher.hexdigest()
