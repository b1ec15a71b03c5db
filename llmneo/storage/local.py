"""A folder on a local (or mounted) file system as a :class:`~llmneo.storage.base.Store`.

A shared folder (a registry on an NFS mount, a ReadWriteMany volume) is writable by others, who can
plant a symbolic link (``<name>/v2 -> /home/you``) to make a writer create or overwrite files outside
the root. So every key is reached from the root one folder at a time through file descriptors opened
with ``O_NOFOLLOW`` (``openat``): a link anywhere below the root is refused with a one-line error
naming it, for writes, renames, folder creation and reads alike, and there is no window between a
check and the write for a link to be swapped in. Listings skip links. The root itself is the user's
choice and may be a link.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import uuid
from pathlib import Path

from llmneo.errors import UserError
from llmneo.storage.base import Entry, Progress

TMP = ".tmp-"  # temporary files: never listed

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class LocalStore:
    """A folder; atomic visibility through a temporary file + rename, conditional create with link();
    no symbolic link below the root is ever followed."""

    def __init__(self, root: str | Path, label: str | None = None):
        self.root = Path(root).expanduser()
        self.uri = str(self.root)
        self.label = label or self.uri
        self.links: set[str] = set()  # symbolic links met (and skipped) by listings, relative to the root

    def url(self, key: str) -> str:
        return str(self.root.resolve() / key)

    # ------------------------------------------------------------------ walking without links
    def _parts(self, key: str) -> list[str]:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or "\0" in key:
            raise UserError(f"{self.label}: refusing unsafe key {key!r} (empty, '.' or '..' part)")
        return parts

    def _link_error(self, dir_fd: int, parts: list[str], i: int) -> UserError:
        rel = "/".join(parts[: i + 1])
        try:
            target = f" (to {os.readlink(parts[i], dir_fd=dir_fd)})"
        except OSError:
            target = ""
        return UserError(f"{self.label}: {rel} is a symbolic link{target}; refusing to follow it out of the "
                         f"store (remove the link)")

    def _is_link(self, dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _is_file(self, dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:  # removed meanwhile (a concurrent writer's temporary file)
            return False

    @contextlib.contextmanager
    def _folder(self, key: str, create: bool):
        """The open folder that holds ``key`` (yields ``(fd, file name)``), reached from the root one
        part at a time without following a link (one names itself in a UserError). A missing folder
        is created when ``create``, else the fd is None."""
        parts = self._parts(key)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)  # the root may be a link: the user's choice
        except (FileNotFoundError, NotADirectoryError):
            if create:
                raise
            yield None, parts[-1]
            return
        try:
            for i, part in enumerate(parts[:-1]):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                try:
                    child = os.open(part, _DIR, dir_fd=fd)
                except OSError as e:
                    if self._is_link(fd, part):
                        raise self._link_error(fd, parts, i) from None
                    if not create and e.errno in (errno.ENOENT, errno.ENOTDIR):
                        os.close(fd)
                        fd = None
                        break
                    raise
                os.close(fd)
                fd = child
            yield fd, parts[-1]
        finally:
            if fd is not None:
                os.close(fd)

    def _write_tmp(self, fd: int, name: str, chunks, progress: Progress = None):
        """Write ``chunks`` into a new temporary file next to ``name``; (its name, its SHA-256)."""
        tmp = f"{TMP}{uuid.uuid4().hex[:8]}-{name}"
        h = hashlib.sha256()
        out = os.open(tmp, _NEW, 0o666, dir_fd=fd)
        try:
            with open(out, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
                    if progress:
                        progress(len(chunk))
        except BaseException:
            os.unlink(tmp, dir_fd=fd)
            raise
        return tmp, h.hexdigest()

    def _check_target(self, fd: int, parts_key: str, name: str) -> None:
        """A link in place of the file itself: refused (replacing it would be harmless, but it was planted)."""
        if self._is_link(fd, name):
            raise self._link_error(fd, self._parts(parts_key), len(self._parts(parts_key)) - 1)

    # ------------------------------------------------------------------ the Store interface
    def create(self, key: str, data: bytes) -> bool:
        with self._folder(key, create=True) as (fd, name):
            self._check_target(fd, key, name)
            tmp, _ = self._write_tmp(fd, name, [data])
            try:
                # atomic, fails if the name exists (a link too: link() does not follow), content complete
                os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp, dir_fd=fd)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._folder(key, create=True) as (fd, name):
            self._check_target(fd, key, name)
            tmp, _ = self._write_tmp(fd, name, [data])
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)

    def put_file(self, key: str, src: Path, sha256: str | None = None, progress: Progress = None) -> None:
        """Copy ``src`` (hashing on the way: a file changed since it was hashed is refused)."""
        with self._folder(key, create=True) as (fd, name), open(src, "rb") as fin:
            self._check_target(fd, key, name)
            tmp, digest = self._write_tmp(fd, name, iter(lambda: fin.read(1 << 20), b""), progress)
            try:
                if sha256 is not None and digest != sha256:
                    raise UserError(f"{src}: changed while being uploaded (sha256 differs); upload it again")
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=fd)

    @contextlib.contextmanager
    def _open(self, key: str):
        """The regular file ``key`` opened for reading (never through a link), or None when missing."""
        with self._folder(key, create=False) as (fd, name):
            if fd is None:
                yield None
                return
            try:
                handle = os.open(name, _READ, dir_fd=fd)
            except OSError as e:
                if self._is_link(fd, name):
                    raise self._link_error(fd, self._parts(key), len(self._parts(key)) - 1) from None
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    yield None
                    return
                raise
            with open(handle, "rb") as f:
                yield f if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else None

    def get_bytes(self, key: str) -> bytes | None:
        with self._open(key) as f:
            return f.read() if f is not None else None

    def get_file(self, key: str, dest: Path, progress: Progress = None) -> Path:
        """Copy through a temporary file next to ``dest`` (the file system keeps no digest to check:
        callers holding one, like the registry, check it afterwards)."""
        dest = Path(dest)
        with self._open(key) as fin:
            if fin is None:
                raise UserError(f"{self.url(key)}: not found")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.part")
            try:
                with open(tmp, "wb") as fout:
                    while chunk := fin.read(1 << 20):
                        fout.write(chunk)
                        if progress:
                            progress(len(chunk))
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return dest

    def _walk(self, folder: str):
        """(relative folder, file names, sub-folder names) below ``folder`` ("" = the root); links
        are neither followed nor reported. Nothing when the folder is missing (or a link)."""
        if folder:
            with self._folder(f"{folder}/x", create=False) as (fd, _):
                if fd is None:
                    return
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return
        for path, dirs, files, dir_fd in os.fwalk(base, follow_symlinks=False):
            rel = Path(path).relative_to(base).as_posix()
            rel = folder if rel == "." else (f"{folder}/{rel}" if folder else rel)
            real = [f for f in files if not f.startswith(TMP) and self._is_file(dir_fd, f)]
            links = [n for n in (*files, *dirs) if self._is_link(dir_fd, n)]
            self.links.update(f"{rel}/{n}" if rel else n for n in links)
            dirs[:] = [d for d in dirs if d not in links]
            yield rel, real, list(dirs), dir_fd

    def entries(self, prefix: str = "") -> list[Entry]:
        # a prefix is a string prefix of the key, as on S3: "demo/" lists the folder, "de" also matches
        folder = prefix.rpartition("/")[0]
        out = []
        for rel, files, _, dir_fd in self._walk(folder):
            for name in files:
                key = f"{rel}/{name}" if rel else name
                if name.startswith(TMP) or not key.startswith(prefix):
                    continue
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                out.append(Entry(key, st.st_size, str(st.st_mtime_ns)))
        return sorted(out)

    def list(self, prefix: str = "") -> list[str]:
        return [e.key for e in self.entries(prefix)]

    def children(self, prefix: str = "") -> list[str]:
        for _, _, dirs, _ in self._walk(prefix.strip("/")):
            return sorted(dirs)
        return []

    def delete_prefix(self, prefix: str = "") -> int:
        entries = self.entries(prefix)
        for e in entries:
            with self._folder(e.key, create=False) as (fd, name):
                if fd is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
        # then the folders this left empty, up to (not including) the root
        for folder in sorted({e.key.rpartition("/")[0] for e in entries if "/" in e.key},
                             key=lambda k: -k.count("/")):
            while folder:
                parent, _, name = folder.rpartition("/")
                with self._folder(f"{folder}/x", create=False) as (fd, _):
                    if fd is None or os.listdir(fd):
                        break
                with self._folder(folder, create=False) as (fd, _):
                    if fd is None:
                        break
                    with contextlib.suppress(OSError):
                        os.rmdir(name, dir_fd=fd)
                folder = parent
        return len(entries)


BACKEND = LocalStore
