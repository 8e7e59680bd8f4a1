"""The ``slurm_cluster`` fixture: a real one-node SLURM cluster for the tests marked ``slurm``.

It uses the cluster that ``$SLURM_CONF`` names when ``sinfo`` and ``sacct`` answer there
(how ``.ci/run`` runs these tests: ``scripts/slurm/start.sh`` before, ``stop.sh`` after).
Otherwise it starts one with ``scripts/slurm/start.sh`` (root and apt needed; folder
``$FSB_SLURM_DIR``, default ``/tmp/fsb-slurm``) and stops it when the session ends.  Where
SLURM cannot start, every test that asks for it is skipped with the reason.

Accounting (``sacct``) is checked too: submitit reads job states from it, and without it a
cancelled job is never seen as finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: its ``slurm.conf`` and the environment that reaches it."""

    conf: str

    @property
    def env(self) -> dict[str, str]:
        """This process's environment plus ``SLURM_CONF``; jobs inherit it (sbatch --export=ALL)."""
        return {**os.environ, "SLURM_CONF": self.conf, "PYTHONWARNINGS": "ignore"}

    def command(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run a SLURM client command (``squeue``, ``sacct``, ``scancel`` ...) on this cluster;
        its stdout.  With ``check``, a non-zero exit is an error naming the command."""
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout


def cluster_problem(conf: str) -> str:
    """Why the cluster of ``conf`` cannot run submitit jobs ('' when sinfo and sacct answer)."""
    env = {**os.environ, "SLURM_CONF": conf}
    for command in (["sinfo", "-h", "-o", "%a"], ["sacct", "-n", "-X"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            return f"{command[0]} is not installed"
        except subprocess.TimeoutExpired:
            return f"{command[0]} did not answer within 30 s (SLURM_CONF={conf})"
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
            return f"{command[0]} failed with SLURM_CONF={conf}: {lines[-1]}"
    return ""


def _start(folder: str) -> str:
    """Start a cluster in ``folder`` with scripts/slurm/start.sh; '' or why it could not."""
    try:
        done = subprocess.run(["bash", str(SCRIPTS / "start.sh"), folder], capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "scripts/slurm/start.sh did not finish within 900 s"
    if done.returncode == 0:
        return ""
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    return (errors or done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    """The running cluster of ``$SLURM_CONF``, or one started (and later stopped) here."""
    given = os.environ.get("SLURM_CONF", "")
    if given and not cluster_problem(given):
        yield SlurmCluster(given)
        return
    folder = os.environ.get("FSB_SLURM_DIR", "/tmp/fsb-slurm")
    conf = f"{folder}/slurm.conf"
    if Path(conf).is_file() and not cluster_problem(conf):  # up already: not ours to stop
        yield SlurmCluster(conf)
        return
    reason = _start(folder)
    if reason:
        print(f"slurm tests skipped: {reason}", file=sys.stderr)
        pytest.skip(f"SLURM cannot start here: {reason}")
    try:
        yield SlurmCluster(conf)
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh"), folder], capture_output=True, timeout=120)
