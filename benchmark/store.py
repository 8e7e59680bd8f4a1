"""Results on disk: the record of truth.  Torch-free; every write is atomic.

Layout under ``results_dir``::

    runs/<train_key>/config.json        resolved training config and its identity
    runs/<train_key>/state.pt           latest training state (resume by rerunning)
    runs/<train_key>/final.pt           weights after the last step (written once)
    runs/<train_key>/curve.csv          step, loss, lr, seconds
    runs/<train_key>/ema/snapshot-<step>.pt   EMA profiles at a snapshot step (post-hoc EMA)
    runs/<train_key>/evals/<eval_key>.json   one evaluation record (of final.pt)
    runs/<train_key>/rungs/<eval_key>.json   an evaluation of an intermediate checkpoint
                                        (tuning trials report these to their pruner)
    runs/<train_key>/samples/<eval_key>.png  its sample grid
    runs/<train_key>/evals/.<eval_key>.lock  held while that point is evaluated
    mlflow.db, mlartifacts/             the MLflow mirror (mlflow.lock: held while mirroring)
    cache/                              feature networks and reference statistics

A failed run leaves no final.pt and no evaluation record, so it is never taken as cached.
A record that cannot be read (truncated, garbage) is moved aside to
``<name>.corrupt-<UTC time>`` with one line on stderr and counts as missing, so the
command that needs it recomputes it.  Every path here is relative to ``results_dir``: a
copied or moved results folder keeps working.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (with the
    mode a plain ``open`` would give: mkstemp's files are private, 0600).  A failing write
    (full disk, read-only filesystem) leaves ``path`` as it was and raises an OSError that
    names ``path``, not the temp file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


@contextlib.contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (created if missing) for the with-block.
    The kernel drops it when its holder dies, even by SIGKILL, so it never goes stale.
    ``waiting``: a line printed (stderr) when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_record(path: Path, required: tuple[str, ...] = (), then: str = "it will be recomputed") -> dict | None:
    """The JSON object in ``path``, or None when there is none.  A file that is not a JSON
    object holding the ``required`` keys (truncated, garbage) is moved aside to
    ``<name>.corrupt-<UTC time>``, said in one line on stderr (ending with ``then``), and
    read as missing."""
    try:
        with open(path, "rb") as f:
            data, inode = f.read(), os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(data)
        missing = [k for k in required if k not in obj] if isinstance(obj, dict) else ["a JSON object"]
        if not missing:
            return obj
        reason = f"no {missing[0]!r}" if isinstance(obj, dict) else "not a JSON object"
    except (UnicodeDecodeError, ValueError) as err:
        reason = f"{type(err).__name__}: {str(err)[:80]}"
    _move_aside(path, inode, reason, then)
    return None


def _move_aside(path: Path, inode: int, reason: str, then: str) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    try:
        if os.stat(path).st_ino != inode:
            return  # another process replaced it meanwhile (with a good record)
        os.replace(path, aside)
    except FileNotFoundError:
        return  # another process moved it aside first
    print(f"warning: {path} is unreadable ({reason}); moved it aside to {aside.name}; {then}",
          file=sys.stderr, flush=True)


WRITE_HINTS = {
    errno.ENOSPC: "free some space there, or pass results_dir= on a filesystem with room",
    errno.EDQUOT: "free some of your quota there, or pass results_dir= on another filesystem",
    errno.EROFS: "that filesystem is mounted read-only: pass a writable results_dir=",
    errno.EACCES: "this user may not write there: fix its permissions or pass another results_dir=",
    errno.EPERM: "this user may not write there: fix its permissions or pass another results_dir=",
    errno.ENOTDIR: "a file stands where a folder is expected: move that file or pass another results_dir=",
    errno.EISDIR: "a folder stands where a file is expected: move that folder or pass another results_dir=",
}


def os_error_line(err: OSError) -> str:
    """One line for a failed filesystem operation: the path, the errno's meaning and name,
    and the way out."""
    name = errno.errorcode.get(err.errno or 0, "")
    where = f"{err.filename}: " if err.filename else ""
    hint = WRITE_HINTS.get(err.errno or 0, "expected a path this command can read and write")
    return f"{where}{err.strerror or err}{f' ({name})' if name else ''}; {hint}"


class Store:
    def __init__(self, results_dir: str | Path) -> None:
        self.root = Path(results_dir)

    def run_dir(self, train_key: str) -> Path:
        return self.root / "runs" / train_key

    def state_path(self, train_key: str) -> Path:
        return self.run_dir(train_key) / "state.pt"

    def final_path(self, train_key: str) -> Path:
        return self.run_dir(train_key) / "final.pt"

    def eval_path(self, train_key: str, eval_key: str, rung: bool = False) -> Path:
        """An evaluation record: of ``final.pt`` under evals/, of an intermediate checkpoint
        (``rung``) under rungs/, so tables and reports over evals/ see final results only."""
        return self.run_dir(train_key) / ("rungs" if rung else "evals") / f"{eval_key}.json"

    def ema_snapshot_path(self, train_key: str, step: int) -> Path:
        """Power-function EMA profiles at ``step`` (post-hoc EMA reconstructs from these)."""
        return self.run_dir(train_key) / "ema" / f"snapshot-{step:09d}.pt"

    def ema_snapshot_paths(self, train_key: str) -> list[Path]:
        return sorted((self.run_dir(train_key) / "ema").glob("snapshot-*.pt"))

    def grid_path(self, train_key: str, eval_key: str) -> Path:
        return self.run_dir(train_key) / "samples" / f"{eval_key}.png"

    def cache_dir(self) -> Path:
        return self.root / "cache"

    def is_trained(self, train_key: str) -> bool:
        return self.final_path(train_key).is_file()

    def eval_lock(self, train_key: str, eval_key: str) -> contextlib.AbstractContextManager:
        """Held while one evaluation point is computed: concurrent sweeps of the same point
        wait for it and reuse its record instead of computing it again."""
        return file_lock(self.run_dir(train_key) / "evals" / f".{eval_key}.lock",
                         waiting=f"waiting for another process evaluating {train_key}/{eval_key}")

    def has_eval(self, train_key: str, eval_key: str, rung: bool = False) -> bool:
        """A readable record exists (a corrupt one is moved aside: missing, recomputed)."""
        return self.read_record(self.eval_path(train_key, eval_key, rung)) is not None

    def read_eval(self, train_key: str, eval_key: str, rung: bool = False) -> dict:
        record = self.read_record(self.eval_path(train_key, eval_key, rung))
        if record is None:
            raise FileNotFoundError(errno.ENOENT, "no readable evaluation record",
                                    str(self.eval_path(train_key, eval_key, rung)))
        return record

    @staticmethod
    def read_record(path: Path) -> dict | None:
        """An evaluation record (None when missing or moved aside as corrupt)."""
        return read_record(path, ("eval_key", "metrics"))

    def write_eval(self, train_key: str, eval_key: str, record: dict, rung: bool = False) -> None:
        atomic_write_json(self.eval_path(train_key, eval_key, rung), record)

    def write_config(self, train_key: str, config: dict) -> None:
        atomic_write_json(self.run_dir(train_key) / "config.json", config)

    def write_final_summary(self, train_key: str, summary: dict) -> None:
        atomic_write_json(self.run_dir(train_key) / "summary.json", summary)

    def read_config(self, train_key: str) -> dict | None:
        """``config.json`` (its ``identity``), or None when missing or moved aside as corrupt."""
        return read_record(self.run_dir(train_key) / "config.json", ("identity",),
                           then="the next benchmark.run of this run writes it again")

    def read_final_summary(self, train_key: str) -> dict:
        """Training curve and seconds of a finished run (torch-free; written with final.pt)."""
        summary = read_record(self.run_dir(train_key) / "summary.json", ("curve",),
                              then="the run's curve and time are left out of MLflow")
        return summary or {"curve": [], "seconds": None}

    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    def mlflow_uri(self) -> str:
        """The folder's own store, resolved now: it follows a copied or moved folder."""
        return f"sqlite:///{self.mlflow_db().resolve()}"

    def mlflow_artifacts(self) -> Path:
        return (self.root / "mlartifacts").resolve()
