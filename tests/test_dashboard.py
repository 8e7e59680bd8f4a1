"""The dashboard command: a real MLflow server on loopback over the suite's store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark import dashboard
from tests.test_report import CHROMIUM, NO_CHROMIUM, colourful, record_of, toy_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_sweep(tmp_path_factory)


def api(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_until_up(server: subprocess.Popen, log: Path, timeout: float = 90.0) -> str:
    """The URL the dashboard printed, once its server answers ``/health``."""
    deadline = time.monotonic() + timeout
    url = ""
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the dashboard exited before its server came up: {log.read_text()}"
        if not url and log.read_text().startswith("MLflow UI: "):
            url = log.read_text().split()[2]  # "MLflow UI: http://127.0.0.1:PORT  (...)"
        try:
            if url:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        return url
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the MLflow server did not answer within {timeout} s: {log.read_text()}")


def stop(server: subprocess.Popen) -> int:
    """SIGTERM the dashboard (it stops its server's process group); SIGKILL the group if stuck."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return server.returncode


@pytest.fixture(scope="module")
def served(results: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python -m benchmark.dashboard --port 0`` over the toy sweep: (url, experiment id)."""
    log = tmp_path_factory.mktemp("dashboard") / "stdout.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "benchmark.dashboard", "--port", "0",
                                   f"results_dir={results}"], cwd=REPO, stdout=out, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        url = wait_until_up(server, log)
        [experiment] = [e for e in api(url, "experiments/search", {"max_results": 100})["experiments"]
                        if e["name"] == "fewstep-bench"]
        yield url, experiment["experiment_id"]
    finally:
        assert stop(server) == 0


def test_dashboard_rest_api_lists_every_run_with_the_records_metrics(served, results: Path) -> None:
    url, experiment = served
    assert url.startswith("http://127.0.0.1:")
    runs = api(url, "runs/search", {"experiment_ids": [experiment], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    assert sorted(t["kind"] for t in tags) == ["evaluation"] * 4 + ["training"] * 2
    for run, tag in zip(runs, tags):
        if tag["kind"] != "evaluation":
            continue
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        record = record_of(results, tag["method"], int(tag["nfe"]))
        assert metrics["swd"] == pytest.approx(record["metrics"]["swd"], rel=1e-12)
        assert metrics["mmd"] == pytest.approx(record["metrics"]["mmd"], rel=1e-12)
        assert metrics["nfe_counted"] == float(tag["nfe"])
    # the filter a user types in the UI: one method at one NFE
    hits = api(url, "runs/search", {"experiment_ids": [experiment],
                                    "filter": "tags.method = 'meanflow' and tags.nfe = '2'"})["runs"]
    assert len(hits) == 1


def rendered(url: str, png: Path, size: str) -> tuple[str, np.ndarray]:
    """The DOM after MLflow's JS app has fetched and drawn (virtual time) and its screenshot."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                              "--dump-dom", f"--screenshot={png}", f"--window-size={size}", url],
                             capture_output=True, text=True, timeout=120).stdout
    assert png.is_file() and png.stat().st_size > 20_000, f"no useful screenshot of {url}"
    return dom, np.asarray(Image.open(png).convert("RGB"), dtype=int)


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_dashboard_ui_shows_the_evaluation_runs_and_their_metrics(served, results: Path, tmp_path: Path) -> None:
    url, experiment = served
    # the page the dashboard prints: the evaluation runs, one row each
    page = dashboard.runs_page(results / "mlflow.db")
    assert page.startswith(f"/#/experiments/{experiment}/runs?searchFilter=")
    dom, pixels = rendered(url + page, tmp_path / "runs.png", "1600,1000")
    for name in ("fm mlp gaussian1d nfe=1 w=1 ema", "fm mlp gaussian1d nfe=2 w=1 ema",
                 "meanflow mlp gaussian1d nfe=1 w=1 ema", "meanflow mlp gaussian1d nfe=2 w=1 ema"):
        assert name in dom
    assert pixels.std() > 20 and colourful(pixels) > 200  # coloured run dots and links
    assert int((pixels.max(axis=2) < 110).sum()) > 3_000  # run names and column headings
    # one evaluation run's page lists its metrics with the record's values
    record = record_of(results, "meanflow", 2)
    [run] = api(url, "runs/search", {"experiment_ids": [experiment],
                                     "filter": f"tags.eval_key = '{record['eval_key']}'"})["runs"]
    run_id = run["info"]["run_id"]
    dom, _ = rendered(f"{url}/#/experiments/{experiment}/runs/{run_id}", tmp_path / "run.png", "1400,1800")
    assert "meanflow mlp gaussian1d nfe=2 w=1 ema" in dom and "swd" in dom and "mmd" in dom
    assert repr(record["metrics"]["swd"])[:8] in dom


def test_dashboard_refuses_a_non_loopback_host(results: Path, capsys) -> None:
    assert dashboard.main(["--host", "0.0.0.0", f"results_dir={results}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --host 0.0.0.0") and "127.0.0.1" in err[0]
    assert "ssh -L" in err[0]


def test_dashboard_without_a_store_names_the_missing_file(tmp_path: Path, capsys) -> None:
    assert dashboard.main([f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "mlflow.db") in err[0] and "python -m benchmark.run" in err[0]


def test_dashboard_over_a_broken_store_is_one_line_with_the_way_out(tmp_path: Path, capsys) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a sqlite database " * 50)
    assert dashboard.main(["--port", "0", f"results_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"mv {db} {db}.broken" in err[0] and "python -m benchmark.sync" in err[0]


def test_dashboard_on_a_busy_port_suggests_another(results: Path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert dashboard.main(["--port", str(port), f"results_dir={results}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port}" in err[0] and f"--port {port + 1}" in err[0]


@pytest.mark.parametrize("args", [["--port", "http"], ["--port"], ["--color"], ["results_dir="]])
def test_dashboard_argument_mistakes_are_one_line_exit_2(args: list[str], capsys) -> None:
    assert dashboard.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_dashboard_command_binds_loopback_over_the_suites_store(results: Path) -> None:
    from benchmark.store import Store

    command = dashboard.server_command(Store(results), "127.0.0.1", 5123)
    assert command[1:4] == ["-m", "mlflow", "server"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{(results / 'mlflow.db').resolve()}"
    assert command[command.index("--default-artifact-root") + 1] == (results / "mlartifacts").resolve().as_uri()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process groups from Linux's /proc")
def test_the_dashboards_server_dies_with_it_even_when_it_is_killed_with_sigkill(tmp_path: Path) -> None:
    from benchmark.schema import TrackingConfig
    from benchmark.store import Store
    from benchmark.tracking import Tracker

    results = tmp_path / "results"
    assert Tracker(TrackingConfig(), Store(results)).check()  # an empty store to serve
    log = tmp_path / "stdout.log"
    with log.open("w") as out:
        board = subprocess.Popen([sys.executable, "-m", "benchmark.dashboard", "--port", "0",
                                  f"results_dir={results}"], cwd=REPO, stdout=out, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    guard = None
    try:
        url = wait_until_up(board, log)
        [guard] = [int(p) for p in Path(f"/proc/{board.pid}/task/{board.pid}/children").read_text().split()]
        assert len(group_members(guard)) >= 3  # the guard, mlflow server and its uvicorn
        board.kill()  # SIGKILL: no handler of the dashboard runs
        board.wait()
        deadline = time.monotonic() + 30
        while group_members(guard) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group_members(guard) == []
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)
    finally:
        if board.poll() is None:
            board.kill()
        if guard is not None and group_members(guard):
            os.killpg(guard, signal.SIGKILL)
