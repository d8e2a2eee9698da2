"""Writes into a workspace that the file system refuses (full disk, quota, read-only): one clear error.

``workspace_writes(action)`` turns such an ``OSError`` — raised directly, or logged and wrapped by DVC —
into a :class:`WorkspaceWriteError` that names the file, the cause and the fix, instead of a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from strata.models.errors import UserError

REFUSED_WRITES = {
    errno.ENOSPC: "free space on that file system",
    errno.EDQUOT: "free space or raise the quota",
    errno.EROFS: "remount that file system read-write (or work in a writable copy of the workspace)",
}


class WorkspaceWriteError(UserError, RuntimeError):
    """The file system refused a write (full, over quota, read-only); the message names the path and the fix."""


def refused_write(exc: BaseException) -> OSError | None:
    """The full or read-only file system's OSError behind ``exc``, following its causes; None for anything else.

    The errno is what tells: DVC and others let it through as is or re-raise it as their own exception.
    """
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in seen):
        if isinstance(current, OSError) and current.errno in REFUSED_WRITES:
            return current
        seen.append(current)
        current = current.__cause__ or current.__context__
    return None


class _RefusedWriteRecords(logging.Filter):
    """Drops log records about a refused write, keeping the first one's error: the WorkspaceWriteError raised
    afterwards says it once, with the path that error names."""

    def __init__(self) -> None:
        super().__init__()
        self.first: OSError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        refused = refused_write(record.exc_info[1]) if record.exc_info and record.exc_info[1] else None
        self.first = self.first or refused
        return refused is None


@contextmanager
def workspace_writes(action: str) -> Iterator[None]:
    """Report a full or read-only file system met by ``action`` as one clear WorkspaceWriteError.

    The raw OSError would reach the user as a traceback of whichever library was writing (shutil, DVC,
    ruamel); what the user needs is which path, why, and that running the command again after the fix
    completes the work (every Strata step is idempotent, and the ledger row is written last). DVC logs
    every file it failed to copy into its cache or remote, with the traceback (once by its own handler,
    again through the root logger's), before it gives up: those records are dropped while ``action`` runs.
    """
    handlers = {h for name in ("", "dvc", "dvc_data", "dvc_objects") for h in logging.getLogger(name).handlers}
    quiet = _RefusedWriteRecords()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    except Exception as exc:
        refused = refused_write(exc)
        # refused_write returns only errors whose errno is in REFUSED_WRITES; the errno test narrows the type
        if refused is None or refused.errno is None:
            raise
        named = next((e for e in (refused, quiet.first) if e is not None and e.filename), None)
        path = (named.filename2 or named.filename) if named else "the workspace"
        raise WorkspaceWriteError(
            f"{action} stopped, nothing was recorded: {os.strerror(refused.errno)} writing "
            f"{path}. {REFUSED_WRITES[refused.errno].capitalize()}, then run the same command "
            f"again."
        ) from exc
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
