"""What every storage backend offers (:class:`Store`) and the checks shared by all of them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple, Protocol, runtime_checkable

from llmneo.errors import UserError

Progress = Callable[[int], object] | None  # called with the number of bytes just transferred

_DRIVE = re.compile(r"^[A-Za-z]:")


class Entry(NamedTuple):
    """One object of a listing: its key (relative to the store root), size in bytes, and a tag that
    changes when the content changes (S3 ETag; the modification time of a local file)."""

    key: str
    size: int
    tag: str


@runtime_checkable
class Store(Protocol):
    """Objects under one root (a folder, ``s3://bucket/prefix``, …), addressed by ``/``-separated keys
    relative to it. Writes become visible whole (a reader never sees half an object) and listings never
    show an unfinished write."""

    uri: str  # the root, as the user wrote it
    label: str  # what one-line errors name (``uri`` unless the caller gave a better one)

    def url(self, key: str) -> str:
        """Where ``key`` lives, for manifests and messages."""

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet (atomically: of concurrent creators exactly one
        wins); False when it already existed."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write (or replace) ``key``."""

    def put_file(self, key: str, src: Path, sha256: str | None = None, progress: Progress = None) -> None:
        """Upload the file ``src`` to ``key``; ``sha256`` (hex) is its expected digest: a file changed
        since it was hashed is refused. The digest is kept with the object so that :meth:`get_file`
        verifies it."""

    def get_bytes(self, key: str) -> bytes | None:
        """The content of ``key``, or None when it does not exist."""

    def get_file(self, key: str, dest: Path, progress: Progress = None) -> Path:
        """Download ``key`` to ``dest`` through a temporary file, verified against the digest the
        store kept; ``dest`` appears only once complete and verified."""

    def entries(self, prefix: str = "") -> list[Entry]:
        """Every object whose key starts with ``prefix`` (recursive), sorted by key."""

    def list(self, prefix: str = "") -> list[str]:
        """The keys of :meth:`entries`."""

    def children(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-folders of ``prefix`` (``""``: the root)."""

    def delete_prefix(self, prefix: str = "") -> int:
        """Delete every object under ``prefix`` (``""``: everything under the root); the number deleted."""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def safe_path(rel: str, dest: str | Path, what: str = "") -> Path:
    """``dest / rel`` for a relative path that came from an untrusted place (a manifest entry, a key
    below an S3 prefix), or a one-line UserError naming it.

    Refused: empty paths or parts (``a//b``, a trailing ``/``), absolute paths, ``.`` and ``..`` parts,
    backslashes and drive letters (Windows separators a later tool could honour), NUL, and anything
    that would resolve outside ``dest`` (through a symbolic link already there). Call it for every path
    *before* writing any of them.
    """
    where = f"{what}: " if what else ""
    bad = None
    if not isinstance(rel, str) or not rel:
        bad = "empty path"
    elif "\\" in rel or "\0" in rel or _DRIVE.match(rel) or PureWindowsPath(rel).anchor:
        bad = "backslash, drive or NUL in the path"
    elif PurePosixPath(rel).is_absolute():
        bad = "absolute path"
    elif any(part in ("", ".", "..") for part in rel.split("/")):
        bad = "empty, '.' or '..' part"
    if bad is None:
        root = Path(dest).resolve()
        target = (root / rel).resolve()
        if target == root or not target.is_relative_to(root):
            bad = "resolves outside the destination"
    if bad is not None:
        raise UserError(f"{where}refusing unsafe path {rel!r} ({bad}); the source may have been tampered with")
    return Path(dest) / rel
