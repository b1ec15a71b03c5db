"""User-facing errors: printed as one line by the CLI and the KFP components, never as a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the user's input (configuration, data, paths). The message names the field/file/row."""


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type or out-of-range value."""


# Faults of the machine or of a path the user chose, not bugs: one line naming the path and the
# cause. Other OSErrors (a network reset, a bad file descriptor) keep their traceback.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                      errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                      errno.EROFS: "read-only file system", errno.ENAMETOOLONG: "file name too long",
                      errno.ENOTDIR: "a parent is a file, not a folder", errno.EISDIR: "is a folder",
                      errno.EEXIST: "already exists", errno.ENOENT: "no such file or folder",
                      errno.EMFILE: "too many open files", errno.EFBIG: "file too large"}


# libraries that wrap an OS error in their own exception keep its number in the text: safetensors
# "I/O error: No space left on device (os error 28)", pyarrow "[errno 28] No space left on device"
_WRAPPED_ERRNO = re.compile(r"\(os error (\d+)\)|\[errno (\d+)\]", re.IGNORECASE)


def _short(path: str) -> str:
    return path if len(path) <= 200 else path[:96] + "…" + path[-96:]


def environment_error(e: BaseException, where: str | os.PathLike | None = None) -> UserError | None:
    """The one-line :class:`UserError` for an environment fault (``ENOSPC``, ``EACCES``, ...): the
    path (the error's own ``filename``, else ``where``: what the step was writing) and the cause;
    None for other errors. Also recognises an OS error wrapped by a library (safetensors, pyarrow)."""
    number = e.errno if isinstance(e, OSError) else None
    if number is None:
        m = _WRAPPED_ERRNO.search(str(e))
        number = int(m.group(1) or m.group(2)) if m else None
    cause = ENVIRONMENT_ERRNOS.get(number)
    if cause is None:
        return None
    names = [getattr(e, "filename", None), getattr(e, "filename2", None)]
    paths = [_short(os.fsdecode(p)) for p in names if p is not None]
    if not paths and where is not None:
        paths = [_short(os.fsdecode(where))]
    return UserError(f"{' -> '.join(paths) or '(no path given)'}: {cause} ({os.strerror(number)})")


@contextlib.contextmanager
def environment_faults(where: str | os.PathLike):
    """Inside: an environment fault (:func:`environment_error`) becomes a one-line UserError naming
    its path, or ``where`` (the step's output) when the error names none (a write on an open file,
    pyarrow, safetensors)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        mapped = environment_error(e, where)
        if mapped is None:
            raise
        raise mapped from None


def _exit(message: str) -> SystemExit:
    """Exit code 2, carrying the error line (a sweep point records it: llmneo.sweep.PointGuard)."""
    error = SystemExit(2)
    error.llmneo_error = message
    return error


def guarded(fn: Callable, *args, **kwargs):
    """Call ``fn``; on a :class:`UserError` — or an environment fault such as a full disk or a
    denied permission (:func:`environment_error`) — print one line and exit 2 (used by the CLI and
    the components)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise _exit(str(e)) from None
    except OSError as e:  # a path named in the error itself (mkdir, open, rename, ...)
        mapped = environment_error(e)
        if mapped is None:
            raise
        print(f"error: {mapped}", file=sys.stderr, flush=True)
        raise _exit(str(mapped)) from None


def quiet_broken_pipe(fn: Callable, *args, **kwargs):
    """Call ``fn``; when the reader of stdout went away (``llmneo config --keys | head -1``), exit
    quietly like other command-line tools instead of printing a BrokenPipeError traceback."""
    try:
        result = fn(*args, **kwargs)
        sys.stdout.flush()  # a pipe closed after the last print fails here, not at interpreter exit
        return result
    except BrokenPipeError:
        # Python flushes stdout again at exit and would report that failure too: point it at devnull
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE: what a shell reports for `yes | head -1`


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 300 characters:
    what a :class:`UserError` quotes from a third-party failure."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
