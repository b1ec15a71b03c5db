"""A folder on a local (or mounted) file system as a :class:`~llmneo.storage.base.Store`."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from llmneo.errors import UserError
from llmneo.storage.base import Entry, Progress

TMP = ".tmp-"  # temporary files: never listed


class LocalStore:
    """A folder; atomic visibility through a temporary file + rename, conditional create with link()."""

    def __init__(self, root: str | Path, label: str | None = None):
        self.root = Path(root).expanduser()
        self.uri = str(self.root)
        self.label = label or self.uri

    def url(self, key: str) -> str:
        return str((self.root / key).resolve())

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f"{TMP}{uuid.uuid4().hex[:8]}-{path.name}")

    def create(self, key: str, data: bytes) -> bool:
        path = self.root / key
        tmp = self._tmp(path)
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # atomic, fails if the name exists, and the content is complete
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self.root / key
        tmp = self._tmp(path)
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def put_file(self, key: str, src: Path, sha256: str | None = None, progress: Progress = None) -> None:
        """Copy ``src`` (hashing on the way: a file changed since it was hashed is refused)."""
        path = self.root / key
        tmp = self._tmp(path)
        h = hashlib.sha256()
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    h.update(chunk)
                    fout.write(chunk)
                    if progress:
                        progress(len(chunk))
            if sha256 is not None and h.hexdigest() != sha256:
                raise UserError(f"{src}: changed while being uploaded (sha256 differs); upload it again")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def get_file(self, key: str, dest: Path, progress: Progress = None) -> Path:
        """Copy through a temporary file next to ``dest`` (the file system keeps no digest to check:
        callers holding one, like the registry, check it afterwards)."""
        src = self.root / key
        if not src.is_file():
            raise UserError(f"{self.url(key)}: not found")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    fout.write(chunk)
                    if progress:
                        progress(len(chunk))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def entries(self, prefix: str = "") -> list[Entry]:
        # a prefix is a string prefix of the key, as on S3: "demo/" lists the folder, "de" also matches
        folder, _, start = prefix.rpartition("/")
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.name.startswith(TMP) or not p.is_file():
                continue
            key = p.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                st = p.stat()
                out.append(Entry(key, st.st_size, str(st.st_mtime_ns)))
        return sorted(out)

    def list(self, prefix: str = "") -> list[str]:
        return [e.key for e in self.entries(prefix)]

    def children(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def delete_prefix(self, prefix: str = "") -> int:
        entries = self.entries(prefix)
        for e in entries:
            (self.root / e.key).unlink(missing_ok=True)
        # then the folders this left empty, up to (not including) the root
        for folder in sorted({(self.root / e.key).parent for e in entries}, key=lambda p: -len(p.parts)):
            while folder != self.root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
        return len(entries)

BACKEND = LocalStore
