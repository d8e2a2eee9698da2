"""The errors Strata raises on purpose, by what the person at the terminal should do about them.

Every error a user can cause derives from one category below; the category fixes the exit code of the
``strata`` command that ends on it (the CLI prints the message as one ``error:`` line), so a script can
tell "fix the command" from "try again when the store is back" without parsing text. Any other
exception is a bug and keeps its traceback (exit code 1).

The categories live here, in the bottom layer, so that every layer (models, tasks, flows, cli) can
raise them. Concrete errors keep their builtin base too (``class DatasetError(UserError, ValueError)``),
so code that catches ``ValueError`` or ``RuntimeError`` keeps working.

Exit codes: 0 done · 1 a bug · 2 ``UserError`` · 3 ``UnavailableError`` · 4 ``strata doctor`` found broken
links between the stores (a finding, not an error: the command itself completed).
"""

from __future__ import annotations


class StrataError(Exception):
    """An error Strata raises on purpose, with a message that says what is wrong and how to fix it.

    Raise one of the categories below, not this class: ``exit_code`` stays that of a bug (1) here, so an
    error nobody classified does not pass for the user's fault.
    """

    exit_code = 1


class UserError(StrataError):
    """The command cannot do what was asked as asked: a wrong input, option or name, no workspace here,
    or a workspace whose state refuses it (the learner is busy, the ledger is behind, the disk is full).
    Running the same command again will fail the same way; the message says what to change."""

    exit_code = 2


class UnavailableError(StrataError):
    """A store or service the command needs cannot be reached or is damaged: the ledger database, the
    MLflow tracking server, the Prefect API, the workspace's git/DVC repository, an export's files.
    Nothing is wrong with the command; it can succeed once that store answers again."""

    exit_code = 3
