"""Launchers: parallel local jobs through submitit, and a sweep killed mid-way then rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli


def toy_sweep(tmp_path: Path, steps: int) -> list[str]:
    return ["data=gaussian1d", "model=mlp", "train=toy", f"train.steps={steps}", "train.ckpt_every=25",
            "train.progress=false", "eval.num_samples=200", "method=fm,meanflow", "nfe=1,2",
            "launcher=local", "launcher.max_parallel=2", "launcher.timeout_min=10",
            f"results_dir={tmp_path / 'results'}"]


def table(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("|")]


def test_local_launcher_trains_in_parallel_and_a_rerun_launches_nothing(tmp_path: Path) -> None:
    args = toy_sweep(tmp_path, 60)
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("submitted train") == 2 and first.stdout.count("submitted eval") == 2
    assert len(table(first.stdout)) == 2 + 4
    second = run_cli(*args)
    assert second.returncode == 0
    assert "submitted" not in second.stdout
    assert table(second.stdout) == table(first.stdout)


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_records_every_evaluation_exactly_once(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    args = toy_sweep(tmp_path, 400)
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "benchmark.run", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(results.glob("runs/*/state.pt")):
        time.sleep(0.2)
    assert list(results.glob("runs/*/state.pt")), "no checkpoint appeared before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its local jobs (one process group)
    proc.wait()
    assert not list(results.glob("runs/*/evals/*.json"))  # killed before any evaluation
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    records = sorted(results.glob("runs/*/evals/*.json"))
    assert len(records) == 4 and len({p.stem for p in records}) == 4
    assert len(table(rerun.stdout)) == 2 + 4
    assert not list(results.glob("runs/**/.*.tmp"))  # no half-written file left behind
    logs = "".join(p.read_text(errors="ignore") for p in results.glob("submitit/*.err"))
    assert "resuming" in logs  # the killed trainings resumed from their checkpoints
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fewstep-bench")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["kind"] for r in runs) == ["evaluation"] * 4 + ["training"] * 2
