"""How every entry point reports bad input: one line on stderr, ``<prog>: error: <message>``, and
exit status 2 (argparse's own usage errors exit 2 too). 1 is kept for partial success, which an
entry point documents (``caption.py``: some images could not be read), and for a run that stopped
part-way with what it had done kept: a file it could not write (``core.weights.WriteError``: a full
disk, a file size limit; the message names the file, the previous version is kept) or a stop
signal it obeyed (``Stopped``: the message says what was done and how to continue), one line too."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from omegaconf.errors import OmegaConfBaseException

from core.weights import WriteError

USAGE_ERROR, STOPPED_PART_WAY = 2, 1
# errors that mean "bad input": their message names the file, key or value (CheckpointError and
# ImageLoadError are ValueErrors)
INPUT_ERRORS = (ValueError, FileNotFoundError, KeyError, OmegaConfBaseException)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``<prog>: error: <message> (see --help)``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


class Stopped(Exception):
    """A run that stopped on request (a signal) part-way, its work so far kept; the message says
    what was done and how to continue."""


def first_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def run_cli(prog: str, run: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None,
            errors: tuple[type[BaseException], ...] = INPUT_ERRORS) -> int:
    """``run(argv)``; an input error is one line on stderr and exit status 2; a failed write or an
    obeyed stop signal one line and exit status 1."""
    try:
        return run(sys.argv[1:] if argv is None else list(argv))
    except (WriteError, Stopped) as err:
        print(f"{prog}: {'stopped' if isinstance(err, Stopped) else 'error'}: {first_line(err)}", file=sys.stderr)
        return STOPPED_PART_WAY
    except errors as err:
        print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
        return USAGE_ERROR
