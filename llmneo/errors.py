"""User-facing errors: printed as one line by the CLI and the KFP components, never as a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the user's input (configuration, data, paths). The message names the field/file/row."""


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type or out-of-range value."""


def guarded(fn: Callable, *args, **kwargs):
    """Call ``fn``; on a :class:`UserError` print one line and exit 2 (used by the CLI and the components)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 300 characters:
    what a :class:`UserError` quotes from a third-party failure."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
