"""The MLflow dashboard over the suite's store, on this machine only.

    python -m benchmark.dashboard [--port 5000] [--host 127.0.0.1] [results_dir=DIR]

starts ``mlflow server`` (the process behind ``mlflow ui``) on the sqlite store
``results/mlflow.db`` with artifacts (sample grids) under ``results/mlartifacts``, bound to
the loopback interface: MLflow has no authentication, so it is never exposed on a network
interface (reach it from another machine with ``ssh -L 5000:127.0.0.1:5000 host``).
``--port 0`` picks a free port.  Ctrl-C stops it; the server ends with the dashboard however
the dashboard ends, even by SIGKILL (``benchmark.guard``: its own process group and a
parent-death signal).  A store that cannot be opened is one line saying how to rebuild it.
In the UI, filter runs with e.g.
``tags.method = 'fm' and tags.nfe = '2'`` or ``metrics.fd < 1``; the metric names are the
ones in the results table (``fd``, ``kid``, ``class_acc``, ``swd``, ``mmd``, ...).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from benchmark import guard
from benchmark.cli import entry
from benchmark.schema import Failure, UserError
from benchmark.store import Store

USAGE = "usage: python -m benchmark.dashboard [--port N] [--host 127.0.0.1] [results_dir=DIR] [--help]"
FILTER_EXAMPLES = ("tags.method = 'fm' and tags.nfe = '2'", "tags.kind = 'evaluation' and metrics.fd < 1",
                   "tags.data = 'digits' and tags.guidance = '2.0'")


@dataclass
class Options:
    port: int = 5000
    host: str = "127.0.0.1"
    results_dir: Path = Path("results")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str]) -> Options:
    opts, args = Options(), list(argv)
    while args:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        if name in ("--port", "--host"):
            if not eq and not args:
                raise UserError(f"{name} needs a value; expected e.g. {name} {opts.port if name == '--port' else opts.host}")
            value = inline if eq else args.pop(0)
            if name == "--host":
                opts.host = value
            elif not value.isdigit() or int(value) > 65535:
                raise UserError(f"--port {value!r} is not a port; expected an integer 0..65535 (0 = any free port)")
            else:
                opts.port = int(value)
        elif name == "results_dir" and eq and inline:
            opts.results_dir = Path(inline)
        else:
            raise UserError(f"unknown argument '{arg}'; expected --port N, --host 127.0.0.1 or results_dir=DIR")
    if not is_loopback(opts.host):
        raise UserError(f"--host {opts.host} would expose the unauthenticated MLflow server to the network; "
                        f"expected a loopback address (127.0.0.1, ::1, localhost); from another machine "
                        f"use ssh -L {opts.port or 5000}:127.0.0.1:{opts.port or 5000} <this host>")
    return opts


def free_port(host: str, port: int) -> int:
    """``port`` if nothing listens there (any free port for 0); a busy port is a ``UserError``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is in use; expected a free port: pass --port "
                            f"{port + 1} (or --port 0 for any free one)") from None
        return probe.getsockname()[1]


def server_command(store: Store, host: str, port: int) -> list[str]:
    """``mlflow server`` over the suite's sqlite store and artifact folder (one worker)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.mlflow_uri(),
            "--default-artifact-root", store.mlflow_artifacts().as_uri(),
            "--host", host, "--port", str(port), "--workers", "1"]


def server_env() -> dict[str, str]:
    """The environment for the server: no background job runner (MLflow's GenAI jobs), which
    the dashboard never uses and which would add worker processes and seconds of start-up."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def plain_command(store: Store, host: str, port: int) -> str:
    return (f"mlflow ui --backend-store-uri {store.mlflow_uri()} "
            f"--default-artifact-root {store.mlflow_artifacts().as_uri()} --host {host} --port {port}")


def runs_page(db: Path, experiment: str = "fewstep-bench") -> str:
    """The UI's path to the suite's evaluation runs (its own page opens on GenAI traces),
    or "" when the store cannot be read for the experiment id."""
    try:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as con:
            row = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)).fetchone()
    except sqlite3.Error:
        return ""
    # sorting by a metric lists nested runs flat, instead of folded under their training
    query = urllib.parse.urlencode({"searchFilter": "tags.kind = 'evaluation'", "orderByKey": "metrics.`nfe_counted`",
                                    "orderByAsc": "true"}, quote_via=urllib.parse.quote)
    return f"/#/experiments/{row[0]}/runs?{query}" if row else ""


def prepare(opts: Options) -> tuple[list[str], str]:
    """The server command and its URL, after checking the store and the port."""
    store = Store(opts.results_dir)
    db = store.root / "mlflow.db"
    if not db.is_file():
        raise UserError(f"no MLflow store at {db}; expected one written by python -m benchmark.run "
                        f"(tracking.enabled=true, the default) with results_dir={opts.results_dir}")
    port = free_port(opts.host, opts.port)
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return server_command(store, opts.host, port), f"http://{host}:{port}"


def store_problem(store: Store) -> str:
    """Why the store cannot be opened ("" when it can): MLflow opens it (under the mirror
    lock, as the benchmark does), so a half-created or foreign file is said here, in one
    line with the way out, instead of by a server that never answers."""
    from benchmark.schema import TrackingConfig
    from benchmark.tracking import Tracker

    tracker = Tracker(TrackingConfig(), store, quiet=True)
    return "" if tracker.check() else tracker.problem


def main(argv: list[str] | None = None) -> int:
    return entry(_main, argv, USAGE + "\n\n" + (__doc__ or "").strip())


def _main(argv: list[str]) -> int:
    opts = parse_args(argv)
    command, url = prepare(opts)
    store = Store(opts.results_dir)
    problem = store_problem(store)
    if problem:
        raise Failure(problem)
    print(f"MLflow UI: {url}  (store {store.mlflow_uri()}; Ctrl-C stops it)")
    page = runs_page(store.root / "mlflow.db")
    if page:
        print(f"evaluation runs: {url}{page}")
    print(f"same as: {plain_command(store, opts.host, int(url.rsplit(':', 1)[1]))}")
    print("filter runs in the UI with e.g.: " + " | ".join(FILTER_EXAMPLES), flush=True)
    # its own process group (mlflow server starts a uvicorn child: stopping must reach it),
    # guarded: it ends when this process ends, even by SIGKILL
    server = guard.spawn(command, env=server_env())
    signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` stops the server like Ctrl-C does
    try:
        return server.wait()
    except KeyboardInterrupt:
        stop(server)
        return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop(server: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate the server's process group, killing it if it lingers past ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    sys.exit(main())
