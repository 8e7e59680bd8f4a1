"""Shared fixtures: tests compose the real configs and shrink them (tiny budgets, tmp dirs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_overrides(tmp_path: Path) -> list[str]:
    """A complete run that takes seconds: 1-D Gaussian data, the MLP backbone."""
    return ["data=gaussian1d", "model=mlp", "train=toy", "train.steps=40", "train.ckpt_every=20",
            "train.progress=false", "eval.num_samples=200", f"results_dir={tmp_path / 'results'}"]


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600):
    """Run ``python -m benchmark.run`` in a subprocess (as a user would)."""
    import subprocess

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "benchmark.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
