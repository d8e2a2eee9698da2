"""Run the ``strata`` CLI and SIGKILL it at a chosen point: the crash no ``except`` or ``finally`` sees.

    python tests/killpoint.py MODULE:QUALNAME {call|return} -- STRATA-ARGS...

``call`` kills the process as the function is entered, ``return`` right after it returned. The
target is patched where callers look it up (a module attribute or a class attribute), so the
kill lands between two real steps of the command, like ``kill -9`` from an operator would.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(target: str, when: str) -> None:
    """Replace ``target`` with a wrapper that kills this process on entry or on return."""
    if when not in ("call", "return"):
        raise SystemExit(f"killpoint: WHEN must be call or return, not {when!r}")
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original: Callable = getattr(owner, name)

    @functools.wraps(original)
    def killing(*args, **kwargs):
        if when == "call":
            _die()
        result = original(*args, **kwargs)
        _die()
        return result

    setattr(owner, name, killing)


if __name__ == "__main__":
    target, when, separator, *strata_args = sys.argv[1:]
    if separator != "--":
        raise SystemExit(__doc__)
    arm(target, when)
    from strata.cli.app import app

    app(strata_args, prog_name="strata")
