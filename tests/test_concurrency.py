"""Nothing lost, nothing doubled: identical sweeps started together, and a mirror killed
with SIGKILL while a run is half-logged, leave one MLflow run per unit and compute each
unit once."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from benchmark.run import main
from tests.conftest import REPO
from tests.test_tracking import all_runs

pytestmark = pytest.mark.slow


def toy(results: Path, *extra: str) -> list[str]:
    return ["data=gaussian1d", "model=mlp", "train=toy", "train.steps=60", "train.ckpt_every=30",
            "train.progress=false", "eval.num_samples=200", f"results_dir={results}", *extra]


def test_four_identical_sweeps_started_together_compute_each_unit_once_and_mirror_it_once(tmp_path: Path) -> None:
    results = tmp_path / "results"  # new: the four race to create the MLflow store too
    args = toy(results, "method=fm,meanflow", "nfe=1,2")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    drivers = [subprocess.Popen([sys.executable, "-m", "benchmark.run", *args], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outputs = [d.communicate(timeout=900) for d in drivers]
    assert [d.returncode for d in drivers] == [0] * 4, [err for _, err in outputs]
    said = "".join(out for out, _ in outputs)
    trained = Counter(re.findall(r"^trained training (\w+)$", said, re.M))
    evaluated = Counter(re.findall(r"^evaluated (\w+) ", said, re.M))
    assert len(trained) == 2 and set(trained.values()) == {1}  # each training computed once
    assert len(evaluated) == 4 and set(evaluated.values()) == {1}  # each point computed once
    assert not any("warning: MLflow" in err for _, err in outputs)  # the store was never broken
    runs = all_runs(results)  # deleted runs included
    assert sorted(r.data.tags["kind"] for r in runs) == ["evaluation"] * 4 + ["training"] * 2
    assert {r.data.tags["train_key"] for r in runs if r.data.tags["kind"] == "training"} == set(trained)
    assert {r.data.tags["eval_key"] for r in runs if r.data.tags["kind"] == "evaluation"} == set(evaluated)
    assert {r.info.status for r in runs} == {"FINISHED"} and {r.info.lifecycle_stage for r in runs} == {"active"}
    tables = {tuple(ln for ln in out.splitlines() if ln.startswith("|")) for out, _ in outputs}
    assert len(tables) == 1 and len(next(iter(tables))) == 2 + 4  # the same table four times


def running_runs(db: Path) -> int:
    """Runs the store holds as RUNNING right now (0 while it does not exist yet)."""
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=0.05) as con:
            return con.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:
        return 0


def kill_while_a_run_is_half_logged(args: list[str], results: Path) -> bool:
    """Start ``benchmark.run`` on a sweep whose records are all on disk (so all it does is
    mirror them) and SIGKILL it the moment a run it is logging shows as RUNNING in the
    store; False if it finished before that could be seen."""
    command = subprocess.Popen([sys.executable, "-m", "benchmark.run", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = results / "mlflow.db"
    while command.poll() is None:
        if running_runs(db):
            command.send_signal(signal.SIGKILL)
            command.wait()
            return True
        time.sleep(0.001)
    return False


def test_sigkill_during_mirroring_then_a_rerun_leaves_no_duplicate_and_no_run_running(tmp_path: Path) -> None:
    results = tmp_path / "results"
    args = toy(results, "method=fm", "nfe=1,2,4")
    assert main([*args, "tracking.enabled=false"]) == 0  # the records on disk, not mirrored yet
    for _ in range(5):
        if kill_while_a_run_is_half_logged(args, results):
            break
        (results / "mlflow.db").unlink()  # finished too fast to be caught: start over
    else:
        pytest.fail("never caught the mirror with a run half-logged in 5 tries")
    half = [r for r in all_runs(results) if r.info.status == "RUNNING"]
    assert len(half) == 1  # what the kill left: a run created, not finished
    assert main(args) == 0  # the rerun mirrors what is missing
    runs = all_runs(results)
    assert sorted(r.data.tags["kind"] for r in runs) == ["evaluation"] * 3 + ["training"]
    assert {r.info.status for r in runs} == {"FINISHED"} and {r.info.lifecycle_stage for r in runs} == {"active"}
    [done] = [r for r in runs if r.info.run_id == half[0].info.run_id]  # the half-logged run, finished
    if done.data.tags["kind"] == "evaluation":
        assert {"swd", "mmd", "nfe_counted"} <= set(done.data.metrics)
    else:
        assert "train_seconds" in done.data.metrics
    training = next(r for r in runs if r.data.tags["kind"] == "training")
    assert all(r.data.tags["mlflow.parentRunId"] == training.info.run_id
               for r in runs if r.data.tags["kind"] == "evaluation")
