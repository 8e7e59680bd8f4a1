"""Launchers: parallel local jobs through submitit, and a sweep killed mid-way then rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.launch import StatusLine, _outcome, format_status
from tests.conftest import REPO, run_cli


def toy_sweep(tmp_path: Path, steps: int) -> list[str]:
    return ["data=gaussian1d", "model=mlp", "train=toy", f"train.steps={steps}", "train.ckpt_every=25",
            "train.progress=false", "eval.num_samples=200", "method=fm,meanflow", "nfe=1,2",
            "launcher=local", "launcher.max_parallel=2", "launcher.timeout_min=10",
            f"results_dir={tmp_path / 'results'}"]


def table(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("|")]


@pytest.mark.slow
def test_local_launcher_trains_in_parallel_and_a_rerun_launches_nothing(tmp_path: Path) -> None:
    args = toy_sweep(tmp_path, 60)
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("submitted train") == 2 and first.stdout.count("submitted eval") == 2
    assert len(table(first.stdout)) == 2 + 4
    finals = [ln for ln in first.stdout.splitlines() if ln.startswith("launcher=local: 0 pending, 0 running")]
    assert [ln.split(";")[0] for ln in finals] == ["launcher=local: 0 pending, 0 running, 2 done, 0 failed of 2 job(s)"] * 2
    assert "\r" not in first.stdout  # not a terminal: plain lines, no in-place rewrite
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


def wait_done(*jobs, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not all(job.done() for job in jobs):
        assert time.time() < deadline, [job.state for job in jobs]
        time.sleep(0.2)


def test_the_status_line_counts_real_local_jobs_by_their_submitit_states(tmp_path: Path) -> None:
    import submitit

    executor = submitit.LocalExecutor(folder=str(tmp_path / "jobs"))
    executor.update_parameters(timeout_min=5)
    sleeper = executor.submit(time.sleep, 120)
    ok, bad = executor.submit(sum, [1, 2]), executor.submit(int, "not a number")
    wait_done(ok, bad)
    states = [sleeper.state, ok.state, bad.state]
    assert states == ["RUNNING", "FINISHED", "FINISHED"]  # a local job's state does not tell a failure
    assert format_status("local", states, 65.7, waiting=1) == \
        "launcher=local: 1 pending, 1 running, 2 done, 0 failed of 4 job(s); 0:01:05 elapsed"
    outcomes = [_outcome("ok", ok), _outcome("bad", bad)]  # collected: the result tells it
    assert [o.ok for o in outcomes] == [True, False] and "ValueError" in outcomes[1].error
    assert format_status("local", [sleeper.state], 5, finished=[o.ok for o in outcomes]) == \
        "launcher=local: 0 pending, 1 running, 1 done, 1 failed of 3 job(s); 0:00:05 elapsed"
    os.kill(int(sleeper.job_id), signal.SIGKILL)  # a local job's id is its process id
    wait_done(sleeper)
    assert sleeper.state == "INTERRUPTED"
    assert format_status("slurm", [sleeper.state, "PENDING", "CANCELLED by 1000", "COMPLETED"], 3600) == \
        "launcher=slurm: 1 pending, 0 running, 1 done, 2 failed of 4 job(s); 1:00:00 elapsed"


def test_the_status_line_rewrites_itself_on_a_terminal_and_prints_seldom_elsewhere(capsys) -> None:
    tty = StatusLine(tty=True)
    tty.show("a")
    tty.show("a")  # unchanged: not drawn again
    tty.show("b")
    tty.clear()
    tty.close("c")
    assert capsys.readouterr().out == "\ra\x1b[K\rb\x1b[K\r\x1b[Kc\n"
    log = StatusLine(every_s=60, tty=False)
    log.show("a")
    log.show("b")  # changed, but within a minute of the last line
    log.close("c")  # the last status always gets its line
    assert capsys.readouterr().out == "a\nc\n"


def test_an_evaluation_task_warned_of_its_time_limit_is_requeued_as_itself(tmp_path: Path) -> None:
    """submitit requeues a task on SLURM's time-limit warning only when it is Checkpointable;
    an evaluation task is resubmitted whole and skips the points already recorded."""
    from submitit.helpers import Checkpointable

    from benchmark.launch import EvalTask, TrainTask

    task = EvalTask(job=None, evals=[], results_dir=str(tmp_path), threads=1)
    resubmission = task.checkpoint()
    assert isinstance(task, Checkpointable) and issubclass(TrainTask, Checkpointable)
    assert resubmission.function is task and resubmission.args == () and resubmission.kwargs == {}
