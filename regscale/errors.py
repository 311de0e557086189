"""Errors a user can fix: the CLI prints their message as one line and exits 2."""

from __future__ import annotations

import errno
import os
from typing import Optional


class UserError(RuntimeError):
    """Bad input (a path, a shard, a checkpoint, a cluster answer) with a message naming it."""


def debug() -> bool:
    """REGSCALE_DEBUG=1: show the traceback behind an expected failure too."""
    return os.environ.get("REGSCALE_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    """A message as a single line: newlines (a tool's stderr, a parser's context) become '; '."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def os_error_message(err: OSError) -> str:
    """What an OSError means for the user, naming the path: 'no space left on /x', ..."""
    where = err.filename if err.filename is not None else "?"
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {where if err.filename is not None else 'the device being written'} (disk or quota full)"
    reason = err.strerror or type(err).__name__
    return f"{where}: {reason}" if err.filename is not None else reason


def expected_failure(err: BaseException) -> Optional[str]:
    """The one-line message of a failure the user can act on, or None for a bug (a traceback).

    UserError is bad input named by the code that found it; OSError is the file system or the
    network refusing (read-only, full, not a directory, unreachable), named by its path.
    """
    if isinstance(err, UserError):
        return one_line(str(err))
    if isinstance(err, OSError):
        return one_line(os_error_message(err))
    return None
