"""The one error policy every command-line entry point shares.

Each ``python -m benchmark.<tool>`` calls :func:`entry` with the function that does its
work, so that no user input ever ends in a traceback:

- ``-h`` / ``--help`` anywhere prints the tool's help and exits 0, before anything runs;
- :class:`~benchmark.schema.UserError` (a mistake in what was asked) is one ``error:`` line,
  exit 2, and nothing was written (tools check everything before they write);
- :class:`~benchmark.schema.Failure` (the work ran and failed, e.g. a diverged training) is
  one ``error:`` line, exit 1;
- an ``OSError`` (a full disk, a read-only folder) is one line naming the path and the way
  out, exit 1;
- Ctrl-C says how to resume, exit 130;
- anything else is a bug in the suite: one line naming it and a file holding the full
  traceback (``BENCHMARK_TRACEBACK=1`` re-raises it instead), exit 1.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

from benchmark.schema import Failure, UserError

HELP_FLAGS = ("-h", "--help")


def wants_help(argv: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def _crash_file() -> str:
    fd, path = tempfile.mkstemp(prefix=f"benchmark-crash-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        traceback.print_exc(file=fh)
    return path


def entry(body: Callable[[list[str]], int | None], argv: list[str] | None, help_text: str | Callable[[], str],
          *, interrupted: str = "interrupted") -> int:
    """Run ``body(argv)`` under the shared policy and return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print(help_text() if callable(help_text) else help_text)
        return 0
    try:
        return body(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Failure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        from benchmark.store import os_error_line

        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as err:  # a bug of the suite, not of the input: keep the traceback, show one line
        if os.environ.get("BENCHMARK_TRACEBACK"):
            raise
        print(f"internal error: {type(err).__name__}: {err}; the traceback is in {_crash_file()} "
              f"(BENCHMARK_TRACEBACK=1 prints it); please report it", file=sys.stderr)
        return 1
