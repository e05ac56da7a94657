"""What every ``python -m moco_xla.*`` command line shares.

A parser whose mistakes are one-line errors (with a did-you-mean for a mistyped flag), the
handler that turns a stopped run into its message and exit code (errors.py), the checks on
``--out`` and the default name of a new run directory. The commands themselves (launch, eval,
export, shards, bench) only declare their flags and call their library.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from .errors import Preempted, RunStopped, UserError


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise UserError (exit 2, one line), suggesting the closest flag."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings]
            for word in message.split(":", 1)[1].split():
                guess = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                if word.startswith("-") and guess:
                    message += f"; did you mean {guess[0]}?"
                    break
        raise UserError(f"{message} (see {self.prog} --help)")


def parser(prog: str, doc: str, epilog: bool = False) -> Parser:
    """A command's parser: its docstring's first line as the description (the rest as the epilog)."""
    return Parser(prog=prog, description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                  epilog=doc.split("\n", 2)[2] if epilog else None)


def run(body: Callable[[], int], argv: list[str]) -> int:
    """``body()``'s exit code; a RunStopped becomes one line on stderr and its exit code (with
    ``--debug`` in ``argv``, the traceback first)."""
    try:
        return body()
    except RunStopped as e:
        if "--debug" in argv:
            traceback.print_exc()
        kind = "preempted" if isinstance(e, Preempted) else "error"
        print(f"{kind}: {e}", file=sys.stderr, flush=True)
        return e.exit_code


def out_dir(out: Path) -> Path:
    """``--out`` as a directory to write in (it may not exist yet); UserError for a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    return out


def out_file(out: Path) -> Path:
    """``--out`` as a file to write; UserError for a directory."""
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory; pass a file name")
    return out


def run_name(name: str) -> str:
    """A new run's directory name: ``name-YYYYmmdd-HHMMSS``."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def argv_or_sys(argv: list[str] | None) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)
