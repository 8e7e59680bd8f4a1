"""Progress shown to a person at a terminal, and only there: tqdm bars (sampling, feature
extraction, evaluation points) and the lines printed around them.  A bar is drawn when its
config asks for it (``eval.progress``, ``train.progress``) and stdout and stderr are both a
terminal, so job logs, pipes and tests stay free of carriage-return noise.  Torch-free.
"""

from __future__ import annotations

import sys


def interactive() -> bool:
    """Someone is watching: stdout and stderr are both a terminal (not a pipe, a job's log
    file or a test's capture), so progress bars are drawn."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it", iterable=None):
    """A tqdm bar on stderr (over ``iterable`` if given), drawn only when ``enabled`` (the
    config's ``progress``) and :func:`interactive`; it disappears when it closes, leaving
    the log clean."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not (enabled and interactive()),
                leave=False, dynamic_ncols=True, mininterval=0.5)


def say(line: str) -> None:
    """Print a line (flushed) above any progress bar being drawn, not through it."""
    from tqdm.auto import tqdm

    tqdm.write(line)
    sys.stdout.flush()
