"""SLURM through the real command line: a sweep, a time-limit requeue, a cancelled job.

Each test runs ``python -m benchmark.run ... launcher=slurm`` as a user would, against the
real one-node cluster of the ``slurm_cluster`` fixture, with its own results and submitit
folders (job ids restart at 1 on a fresh cluster: a reused submitit folder would hand back
another job's results).  Marked ``slurm``: run them with ``python -m pytest -m slurm``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.slurm_cluster import REPO, SlurmCluster, slurm_cluster_fixture  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slurm

# A complete run in seconds; one torch thread per job (two jobs share the two CPUs).
TOY = ["data=gaussian1d", "model=mlp", "train=toy", "train.progress=false", "eval.num_samples=200",
       "launcher=slurm", "launcher.threads=1"]
SUBMITTED = re.compile(r"submitted (train|eval) (\S+) (\w+) as job (\S+)")
RESUMING = re.compile(r"resuming (\w+) from step (\d+)")
USR2 = 1 << 11  # bit of signal 12 in /proc/<pid>/status pending masks


def folders(tmp_path: Path) -> list[str]:
    return [f"results_dir={tmp_path / 'results'}", f"launcher.folder={tmp_path / 'submitit'}"]


def run(cluster: SlurmCluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m benchmark.run`` on the cluster, to the end."""
    return subprocess.run([sys.executable, "-m", "benchmark.run", *args], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


def wait_until(done: Callable[[], object], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.1)


class Background:
    """``python -m benchmark.run`` running in the background, its output read as it comes.
    Leaving the block ends the command and cancels its jobs if they are still there."""

    def __init__(self, cluster: SlurmCluster, args: list[str]) -> None:
        self.cluster = cluster
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmark.run", *args], cwd=REPO,
                                     env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._drain, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _drain(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def submitted(self, kind: str, timeout: float = 120) -> tuple[str, str]:
        """(train key, job id) of the first ``kind`` job the command submits."""
        def first() -> re.Match | None:
            return next((m for m in map(SUBMITTED.search, list(self.out)) if m and m[1] == kind), None)

        wait_until(lambda: first() or self.proc.poll() is not None, timeout, f"a submitted {kind} job")
        match = first()
        assert match, f"the command ended before submitting a {kind} job:\n" + self.text()
        return match[3], match[4]

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=10)
        return code

    def text(self) -> str:
        return "\n".join(self.out + self.err)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for match in filter(None, map(SUBMITTED.search, self.out)):
            self.cluster.command("scancel", match[4], check=False)


def submitted_jobs(stdout: str) -> list[tuple[str, str, str, str]]:
    """(kind, method, train key, job id) of every job a command submitted."""
    return SUBMITTED.findall(stdout)


def table_rows(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]


def job_states(cluster: SlurmCluster, job_id: str) -> list[str]:
    """The state of each run of the job, oldest first (``sacct -D`` keeps requeued runs)."""
    out = cluster.command("sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State")
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def queue_state(cluster: SlurmCluster, job_id: str) -> str:
    """PENDING, RUNNING, ... while the job is in the queue; '' after."""
    return cluster.command("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip()


def task_pids(cluster: SlurmCluster, job_id: str) -> list[int]:
    """PIDs of the job's task (step 0: the Python process submitit runs); [] when not running."""
    out = cluster.command("scontrol", "listpids", job_id, check=False)
    return [int(row.split()[0]) for row in out.splitlines()[1:] if row.split()[2:3] == ["0"]]


def usr2_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = [int(ln.split()[1], 16) for ln in status.splitlines() if ln.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & USR2 for mask in masks)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def hold_until_time_limit_warning(cluster: SlurmCluster, job_id: str, timeout: float = 90) -> None:
    """Stop the job's task until SLURM's time-limit warning (USR2) is pending on it, then let
    it go on, so it meets the warning mid-training whatever the CPU's speed.

    slurmctld checks time limits every 30 s and sends ``--signal=USR2@30`` up to 30 s early,
    so a 1-minute job is warned at its first check, 0 to 30 s after it starts: a training of
    fixed length would finish first on a fast machine.  SIGSTOP (scancel --signal) holds
    the task without stopping SLURM's clock; the pending signal runs submitit's handler
    (checkpoint, requeue) as soon as the task continues."""
    pids = task_pids(cluster, job_id)
    cluster.command("scancel", "--signal=STOP", job_id, check=False)
    try:
        wait_until(lambda: any(map(usr2_pending, pids)) or not any(map(alive, pids)), timeout,
                   f"SLURM's time-limit warning to job {job_id}")
    finally:
        cluster.command("scancel", "--signal=CONT", job_id, check=False)


# ----------------------------------------------------------------------------------------


def test_sweep_runs_as_slurm_jobs_and_a_rerun_launches_nothing(slurm_cluster: SlurmCluster,
                                                               tmp_path: Path) -> None:
    args = [*TOY, "train.steps=200", "method=fm,meanflow", "nfe=1,2", "launcher.partition=debug",
            "+launcher.additional.comment=fsb-sweep", *folders(tmp_path)]
    first = run(slurm_cluster, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    scripts = [p.read_text() for p in (tmp_path / "submitit").glob("*_submission.sh")]
    assert len(scripts) == 2  # one array per phase
    for script in scripts:
        assert "#SBATCH --partition=debug" in script and "#SBATCH --comment=fsb-sweep" in script

    jobs = submitted_jobs(first.stdout)
    assert sorted((kind, method) for kind, method, _, _ in jobs) == [
        ("eval", "fm"), ("eval", "meanflow"), ("train", "fm"), ("train", "meanflow")]
    for _, _, _, job_id in jobs:
        assert job_states(slurm_cluster, job_id) == ["COMPLETED"]
    for _, _, key, _ in jobs:
        assert (tmp_path / "results" / "runs" / key / "final.pt").is_file()
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*/evals/*.json")]
    assert sorted((r["method"], r["nfe"]) for r in records) == [
        ("fm", 1), ("fm", 2), ("meanflow", 1), ("meanflow", 2)]
    rows = table_rows(first.stdout)
    assert len(rows) == 4

    again = run(slurm_cluster, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted" not in again.stdout
    assert table_rows(again.stdout) == rows


def test_training_past_its_time_limit_is_requeued_and_resumes_from_the_step_it_was_warned_at(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    args = [*TOY, "method=fm", "nfe=1", "train.steps=300", "train.ckpt_every=10", "tracking.enabled=false",
            "launcher.timeout_min=1", "launcher.max_requeues=5", *folders(tmp_path)]
    with Background(slurm_cluster, args) as command:
        key, job_id = command.submitted("train")
        state = tmp_path / "results" / "runs" / key / "state.pt"
        wait_until(state.is_file, 120, f"the first checkpoint of job {job_id}")
        hold_until_time_limit_warning(slurm_cluster, job_id)
        code = command.wait(timeout=300)
    assert code == 0, command.text()

    states = job_states(slurm_cluster, job_id)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    log = (tmp_path / "submitit" / f"{job_id}_0_log.err").read_text()
    resumed = [(k, int(step)) for k, step in RESUMING.findall(log)]
    assert resumed and all(k == key for k, _ in resumed), log
    assert 10 <= resumed[0][1] < 300  # from a checkpoint written before the time limit
    # the warning was deferred to the end of its step, that exact state saved, and the
    # requeued run resumed there (not at the last periodic checkpoint)
    saved = [int(n) for n in re.findall(rf"saved {key} at step (\d+) on the preemption warning", log)]
    assert saved and saved[0] == resumed[0][1], log
    assert (tmp_path / "results" / "runs" / key / "final.pt").is_file()
    records = list((tmp_path / "results" / "runs" / key / "evals").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["nfe"] == 1
    assert len(table_rows("\n".join(command.out))) == 1


def test_cancelled_job_fails_the_command_caches_nothing_and_a_rerun_completes(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    args = [*TOY, "method=fm", "nfe=1", "train.steps=800", "train.ckpt_every=50", "tracking.enabled=false",
            *folders(tmp_path)]
    with Background(slurm_cluster, args) as command:
        key, job_id = command.submitted("train")
        wait_until(lambda: queue_state(slurm_cluster, job_id) == "RUNNING", 120, f"job {job_id} to run")
        slurm_cluster.command("scancel", job_id)
        code = command.wait(timeout=180)
    assert code == 1, command.text()
    failed = [ln for ln in command.err if ln.startswith("failed:")]
    assert len(failed) == 1, command.text()
    assert f"failed: training {key}: job {job_id} (CANCELLED" in failed[0]
    assert job_states(slurm_cluster, job_id) == ["CANCELLED"]
    run_dir = tmp_path / "results" / "runs" / key
    assert not (run_dir / "final.pt").exists()
    assert not list(run_dir.glob("evals/*.json"))
    assert not any("submitted eval" in ln for ln in command.out)

    rerun = run(slurm_cluster, *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (run_dir / "final.pt").is_file()
    assert len(list(run_dir.glob("evals/*.json"))) == 1
    assert len(table_rows(rerun.stdout)) == 1


def test_options_sbatch_refuses_are_one_error_line_with_exit_2(slurm_cluster: SlurmCluster,
                                                              tmp_path: Path) -> None:
    result = run(slurm_cluster, *TOY, "train.steps=20", "method=fm", "nfe=1", "launcher.partition=nosuch",
                 *folders(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sbatch refused the jobs"), result.stderr
    assert "nosuch" in lines[0] and "launcher.partition" in lines[0]
    assert "submitted" not in result.stdout


def test_a_tuning_study_runs_its_trials_as_slurm_jobs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """benchmark.tune with launcher=slurm: trials are SLURM jobs that report their rungs to a
    journal-file study (the storage for clusters without a database)."""
    import optuna
    import yaml
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "swd", "nfe": 1, "n_trials": 3, "report_every": 20, "study": "slurm",
        "base": ["method=fm", "data=two_moons", "model=mlp", "train=toy", "train.steps=40",
                 "train.progress=false", "eval.num_samples=200", "launcher.threads=1"],
        "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}}))
    journal = tmp_path / "study.log"
    proc = subprocess.run([sys.executable, "-m", "benchmark.tune", f"tune={space}", "launcher=slurm",
                           f"tune.storage=journal://{journal}", *folders(tmp_path)], cwd=REPO,
                          env=slurm_cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    jobs = re.findall(r"submitted trial (\d+) as job (\S+)", proc.stdout)
    assert sorted(n for n, _ in jobs) == ["0", "1", "2"]
    accounted = slurm_cluster.command("sacct", "-n", "-X", "-P", "-o", "JobID,State")
    for _, job_id in jobs:
        assert f"{job_id}|COMPLETED" in accounted
    study = optuna.load_study(study_name="slurm", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert all(list(t.intermediate_values) == [20] for t in study.trials)  # reported from the jobs
    assert (tmp_path / "results" / "tune" / "slurm" / "best.yaml").is_file()
