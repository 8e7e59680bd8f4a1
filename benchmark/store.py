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
    mlflow.db, mlartifacts/             the MLflow mirror
    cache/                              feature networks and reference statistics

A failed run leaves no final.pt and no evaluation record, so it is never taken as cached.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (with the
    mode a plain ``open`` would give: mkstemp's files are private, 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


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

    def has_eval(self, train_key: str, eval_key: str, rung: bool = False) -> bool:
        return self.eval_path(train_key, eval_key, rung).is_file()

    def read_eval(self, train_key: str, eval_key: str, rung: bool = False) -> dict:
        return json.loads(self.eval_path(train_key, eval_key, rung).read_text())

    def write_eval(self, train_key: str, eval_key: str, record: dict, rung: bool = False) -> None:
        atomic_write_json(self.eval_path(train_key, eval_key, rung), record)

    def write_config(self, train_key: str, config: dict) -> None:
        atomic_write_json(self.run_dir(train_key) / "config.json", config)

    def write_final_summary(self, train_key: str, summary: dict) -> None:
        atomic_write_json(self.run_dir(train_key) / "summary.json", summary)

    def read_final_summary(self, train_key: str) -> dict:
        """Training curve and seconds of a finished run (torch-free; written with final.pt)."""
        path = self.run_dir(train_key) / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {"curve": [], "seconds": None}

    def mlflow_uri(self) -> str:
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    def mlflow_artifacts(self) -> Path:
        return (self.root / "mlartifacts").resolve()
