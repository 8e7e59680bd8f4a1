"""MLflow at team scale: logging to a real `mlflow server` on loopback, and a run that
completes while the server is down, mirrored afterwards by `benchmark.sync`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmark.run import main
from benchmark.sync import main as sync_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, port: int):
    """A real tracking server on 127.0.0.1 with its own sqlite store and artifact folder."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("mlflow server exited at start")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 90 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def search_runs(uri: str) -> list[dict]:
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=fewstep-bench")
    experiment = json.load(urllib.request.urlopen(req, timeout=10))["experiment"]["experiment_id"]
    body = json.dumps({"experiment_ids": [experiment], "max_results": 100}).encode()
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=10)).get("runs", [])


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.slow
def test_runs_are_logged_to_a_real_mlflow_server_on_loopback(toy_overrides, tmp_path: Path) -> None:
    with mlflow_server(tmp_path / "server", free_port()) as uri:
        assert main([*toy_overrides, "method=fm", "nfe=1,2", f"tracking.uri={uri}"]) == 0
        runs = search_runs(uri)
        kinds = sorted(tags_of(r)["kind"] for r in runs)
        assert kinds == ["evaluation", "evaluation", "training"]
        for run in runs:
            if tags_of(run)["kind"] == "evaluation":
                assert {"swd", "mmd", "nfe_counted"} <= set(metrics_of(run))
                assert metrics_of(run)["nfe_counted"] == float(tags_of(run)["nfe"])


@pytest.mark.slow
def test_run_completes_while_the_server_is_down_and_is_synced_afterwards(toy_overrides, tmp_path, capsys):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    assert main([*toy_overrides, "method=fm", "nfe=1,2", f"tracking.uri={uri}"]) == 0
    err = capsys.readouterr().err
    assert "warning: MLflow" in err and "benchmark.sync" in err
    assert time.perf_counter() - started < 120  # no minutes of retries against a dead server
    results = next(a.split("=", 1)[1] for a in toy_overrides if a.startswith("results_dir="))
    assert len(list(Path(results).glob("runs/*/evals/*.json"))) == 2
    assert sync_main([f"results_dir={results}", f"tracking.uri={uri}"]) == 1  # still down
    with mlflow_server(tmp_path / "server", port):
        assert sync_main([f"results_dir={results}", f"tracking.uri={uri}"]) == 0
        assert len(search_runs(uri)) == 3
        assert sync_main([f"results_dir={results}", f"tracking.uri={uri}"]) == 0
        assert len(search_runs(uri)) == 3  # nothing mirrored twice
