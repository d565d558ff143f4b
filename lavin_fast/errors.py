"""What counts as a user's mistake, and how the command line reports one.

`UserError` is the base of every error a user can cause and fix without reading code: a flag
or config value (`train.TrainConfig`), a checkpoint (`checkpoints.strict.CheckpointError`), a
data file (`scienceqa.DataError`). It is a `ValueError`, so callers of the library catch it as
before. `lavin-fast` and `python -m lavin_fast.train` print such an error, and an `OSError`
(a missing file, a full disk, a permission), as one line

    lavin-fast: error: <message>

on stderr with exit code 2; `LAVIN_FAST_DEBUG=1` shows the traceback instead. Anything else is
a bug of lavin_fast and keeps its traceback. This module imports nothing of lavin_fast, so any
module can use it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

PROGRAM = "lavin-fast"
DEBUG_ENV = "LAVIN_FAST_DEBUG"


class UserError(ValueError):
    """A mistake of the user's (a flag, a value, a file), reported by the CLI as one line."""


@contextlib.contextmanager
def one_line_user_errors() -> Iterator[None]:
    """Turn a UserError or OSError raised inside into `lavin-fast: error: ...` and exit 2."""
    try:
        yield
    except (UserError, OSError) as error:
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        message = " ".join(str(error).split("\n"))
        print(f"{PROGRAM}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse without prefix matching (`--max-step` is not `--max-steps`) and whose usage
    errors are UserErrors, so they print as one line like every other mistake."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")
