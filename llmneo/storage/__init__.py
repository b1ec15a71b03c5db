"""One storage layer for everything llmneo reads from or writes to a folder or a bucket: the model
registry, ``s3://`` data and model sources, and multi-node staging.

    from llmneo.storage import open_store, download_prefix, upload_dir
    store = open_store("s3://bucket/prefix")          # or a folder, or file:///abs/folder
    store.put_file("a/b.bin", Path("b.bin"))          # SHA-256 kept with the object
    store.get_file("a/b.bin", Path("out/b.bin"))      # verified, appears only once complete
    download_prefix("s3://bucket/model", "models/m")  # every object below, each key checked first
    upload_dir("runs/x/adapter", "s3://bucket/stage/adapter")

:class:`~llmneo.storage.base.Store` is the interface (conditional create, bytes and file puts/gets,
listings, delete). Backends are chosen by the URI's scheme: a path or ``file://`` is
:mod:`llmneo.storage.local`, ``SCHEME://…`` is the module ``llmneo/storage/SCHEME.py``, which defines
a store class and names it ``BACKEND``. A new backend (``gs://``, ``az://``) is therefore one new file
here and nothing else: ``open_store`` finds it by its scheme, and the registry, sources and staging
use it unchanged. :func:`~llmneo.storage.base.safe_path` is the one check of every relative path that
comes from a store (a manifest entry, a key below a prefix) before anything is written.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from llmneo.errors import UserError
from llmneo.storage.base import Entry, Progress, Store, safe_path, sha256_file
from llmneo.storage.local import LocalStore

__all__ = ["Entry", "LocalStore", "Progress", "Store", "download_prefix", "open_object", "open_store",
           "safe_path", "sha256_file", "upload_dir"]

_SCHEME = re.compile(r"^([a-z][a-z0-9]*)://")


def open_store(uri: str | Path, label: str | None = None, **options) -> Store:
    """The store rooted at ``uri``: a folder (a path or ``file://…``) or ``SCHEME://…`` (the backend
    ``llmneo.storage.SCHEME``; ``s3`` ships). ``label`` is what its one-line errors name; ``options``
    go to the backend (S3: ``multipart_threshold_mb``, ``multipart_chunk_mb``, ``max_concurrency``)."""
    uri = str(uri)
    if not uri:
        raise UserError(f"{label or 'storage'}: empty location; give a folder or s3://bucket/prefix")
    m = _SCHEME.match(uri)
    if m is None or m.group(1) == "file":
        return LocalStore(uri.removeprefix("file://"), label=label)
    scheme = m.group(1)
    try:
        module = importlib.import_module(f"llmneo.storage.{scheme}")
        backend = module.BACKEND
    except (ModuleNotFoundError, AttributeError):
        raise UserError(f"{label or uri}: no storage backend for {scheme}:// (supported: a folder, file://, "
                        f"s3://)") from None
    return backend(uri, label=label, **options)


def open_object(uri: str, label: str | None = None) -> tuple[Store, str]:
    """``s3://bucket/a/b.json`` → (the store rooted at ``s3://bucket/a``, ``"b.json"``)."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    if not name or not parent or parent.endswith(":/"):
        raise UserError(f"{label or uri}: not the location of an object")
    return open_store(parent, label=label or uri), name


def download_prefix(source: str | Path | Store, dest: str | Path, label: str | None = None) -> list[Path]:
    """Download every object below ``source`` (a URI or a store) into ``dest``, same relative layout.

    Every key is checked with :func:`safe_path` *before* the first file is written (a key with ``..``
    or an absolute part refuses the whole download); each file is verified by the store and appears
    only once complete. Zero-byte folder markers (keys ending in ``/``, such as the AWS console's
    "Create folder" makes; the prefix's own marker is the empty key) are skipped; a key ending in
    ``/`` that holds data is refused like any other unsafe key. Returns the files.
    """
    store = source if isinstance(source, Store) else open_store(source, label=label)
    what = label or store.label
    keys = [e.key for e in store.entries("") if not (e.size == 0 and (e.key == "" or e.key.endswith("/")))]
    if not keys:
        raise UserError(f"{what}: no objects under this prefix")
    targets = [safe_path(k, dest, what) for k in keys]
    return [store.get_file(k, t) for k, t in zip(keys, targets, strict=True)]


def upload_dir(local: str | Path, dest: str | Store, label: str | None = None) -> int:
    """Upload every file under the folder ``local`` to ``dest`` (a URI or a store) at its relative
    path, each with its SHA-256 (so :func:`download_prefix` verifies it). Returns the number of files."""
    store = dest if isinstance(dest, Store) else open_store(dest, label=label)
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        store.put_file(path.relative_to(local).as_posix(), path, sha256_file(path))
    return len(files)
