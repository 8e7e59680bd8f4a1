"""The suite installs anywhere: a wheel (not an editable install) in a fresh virtual
environment outside the repository composes its packaged configs and runs a sweep whose
records land under the current directory's results/, and whose report executes the packaged
notebook (and refuses to rewrite a README it does not have)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "benchmark", "methods", "configs", "reports")


def run(*args: str | Path, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    # no PYTHONPATH: nothing of the checkout may reach the installed interpreter
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONWARNINGS": "ignore"} | (env or {})
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ beside them),
    offline: no build isolation, no index."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    built = run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
                "-w", tmp_path / "wheels", cwd=src)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("fewstep_bench-*.whl")
    return wheel


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_runs_a_sweep_into_the_current_directory(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"benchmark/configs/{p.relative_to(REPO / 'configs').as_posix()}"
               for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and configs <= shipped, sorted(configs - shipped)[:5]
    assert "benchmark/reports/benchmark_report.py" in shipped

    venv = tmp_path / "venv"
    # system site packages give torch & co. without downloading; the wheel alone brings the suite
    made = run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                    "--ignore-installed", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import benchmark, benchmark.config as c; print(benchmark.__file__); "
                              "print(c.CONFIG_DIR)", cwd=elsewhere)
    module, config_dir = where.stdout.split()
    site = venv.resolve()
    assert Path(module).resolve().is_relative_to(site), module  # the wheel, not the checkout's editable install
    assert Path(config_dir).resolve() == Path(module).resolve().parent / "configs"

    sweep = run(python, "-m", "benchmark.run", "data=gaussian1d", "model=mlp", "train=toy", "method=fm",
                "nfe=1,2", "train.steps=20", "train.progress=false", "eval.num_samples=500",
                "tracking.enabled=false", cwd=elsewhere)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in elsewhere.glob("results/runs/*/evals/*.json")]
    assert sorted(r["nfe"] for r in records) == [1, 2]
    assert all(r["method"] == "fm" and r["data"] == "gaussian1d" for r in records)
    assert "records under results/runs" in sweep.stdout

    report = run(python, "-m", "benchmark.report", "--publish", cwd=elsewhere)
    assert report.returncode == 2 and report.stderr.count("error:") == 1, report.stderr[-2000:]
    assert "installed from a wheel" in report.stderr and "Traceback" not in report.stderr
    assert not (elsewhere / "results" / "report").exists()  # refused before anything was written

    # the venv borrows nbconvert from the base interpreter, whose data files (the HTML
    # templates) stay under the base prefix: without JUPYTER_PATH the report says so
    searched = [venv / "share", Path.home() / ".local" / "share", Path("/usr/local/share"), Path("/usr/share")]
    if not any((p / "jupyter" / "nbconvert" / "templates" / "lab").is_dir() for p in searched):
        report = run(python, "-m", "benchmark.report", cwd=elsewhere)
        assert report.returncode == 2 and "nbconvert cannot find its 'lab' HTML template" in report.stderr, \
            report.stderr[-2000:]
        assert not (elsewhere / "results" / "report" / "benchmark_report.ipynb").exists()
    borrowed = Path(sys.base_prefix) / "share" / "jupyter"
    report = run(python, "-m", "benchmark.report", cwd=elsewhere, env={"JUPYTER_PATH": str(borrowed)})
    assert report.returncode == 0, report.stderr[-2000:]
    html = (elsewhere / "results" / "report" / "benchmark_report.html").read_text()
    assert "gaussian1d" in html and "Traceback" not in html
