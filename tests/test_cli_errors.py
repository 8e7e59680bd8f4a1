"""Every command line refuses a mistake the same way: exactly one ``error:`` line on stderr,
exit code 2, no traceback, and nothing written; and every one answers ``--help``.

The commands run as a user runs them (``python -m benchmark.<tool>`` in a subprocess),
each from its own empty folder (the default ``results_dir`` is ``results/`` there), with a
PATH that holds no SLURM client.  They run in a thread pool: each is a fresh interpreter
that fails while parsing or planning, so the table takes a few seconds per core.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CLIS = ("run", "tune", "report", "dashboard", "sync", "table", "stepcost", "config", "flops", "encode")

BAD = [
    # benchmark.run: each is refused while planning, before a results folder or MLflow store exists
    ("run", ["method=meanflow", "method.ratio_r_neq_t=1.5"], "method.ratio_r_neq_t=1.5"),
    ("run", ["method=fm", "method.solver=rk4"], "method.solver='rk4'"),
    ("run", ["method=scm", "method.parameterization=edm"], "method.parameterization='edm'"),
    ("run", ["method=scm", "method.t_max=1.2", "method.t_mid=1.5"], "method.t_mid=1.5"),
    ("run", ["method=imf", "method.v_head=aux", "method.aux_depth=4"], "method.aux_depth=4"),
    ("run", ["method=shortcut", "method.denoise_timesteps=12"], "method.denoise_timesteps=12"),
    ("run", ["method=scm", "nfe=4"], "nfe=4"),
    ("run", ["launcher=slurm"], "sbatch"),
    ("run", ["method=glob(zz*)"], "glob(zz*)"),
    ("run", ["nfe=glob(*)"], "nfe is not a group"),
    ("run", ["train.lr=interval(0,1)"], "interval()"),
    ("run", ["nfe=range(1,3,step=0)"], "range(1,3,step=0)"),
    ("run", ["-dry-run"], "unknown flag -dry-run"),
    ("run", ["-x"], "unknown flag -x"),
    ("run", ["--nosuch"], "unknown flag --nosuch"),
    ("run", ["nfe=1", "nfe=2"], "nfe=1,2"),
    ("run", ["tracking.uri=foo://bar"], "'foo:'"),
    ("run", ["tracking.uri=sqlite://x.db"], "sqlite://x.db"),
    ("run", ["nfe=0"], "nfe=0"),
    ("run", ["model=dit-huge"], "dit-huge"),
    ("run", ["model.name=dit-q"], "dit-q"),
    ("run", ["train.betas=[0.9]"], "train.betas=[0.9]"),
    ("run", ["train.micro_batches=3"], "train.micro_batches=3"),
    ("run", ["train.budget=flops:xyz"], "flops:xyz"),
    ("run", ["eval.ema=abc"], "eval.ema='abc'"),
    ("run", ["train.nosuch=1"], "train.nosuch"),
    ("run", ["--config", "nosuch.yaml"], "nosuch.yaml"),
    ("run", ["data=gaussian1d", "model=mlp", "train=toy", "data.options.nosuch=1"], "data.options.nosuch"),
    ("run", ["data=gaussian1d", "model=mlp", "train=toy", "data.options.std=-1"], "std=[-1.0]"),
    ("run", ["data.options.test_size=5000"], "test_size=5000"),
    ("run", ["model.width=64"], "model.width=64 has no effect on model=dit-tiny"),
    ("run", ["data=gaussian1d", "model=mlp", "train=toy", "model.label_init_std=0.02"],
     "model.label_init_std=0.02 has no effect on model=mlp"),
    # benchmark.tune (its own command line)
    ("tune", ["--nosuch"], "--nosuch"),
    ("tune", ["-x"], "-x"),
    ("tune", ["tune=nosuch"], "nosuch"),
    ("tune", ["tune=fm_toy", "tune.n_trials=0"], "tune.n_trials=0"),
    ("tune", ["tune=fm_toy", "method.solver=rk4"], "method.solver='rk4'"),
    ("tune", ["tune=fm_toy", "nfe=1", "nfe=2"], "nfe=1,2"),
    ("tune", ["tune=fm_toy", "data=gaussian1d", "data.options.std=-1"], "std=[-1.0]"),
    # benchmark.report
    ("report", ["--nosuch"], "--nosuch"),
    ("report", ["results_dir="], "results_dir="),
    ("report", ["results_dir=nowhere"], "nowhere"),
    # benchmark.dashboard
    ("dashboard", ["--port", "abc"], "'abc'"),
    ("dashboard", ["--host", "0.0.0.0"], "0.0.0.0"),
    ("dashboard", ["--nosuch"], "--nosuch"),
    # benchmark.sync
    ("sync", ["results_dir=nowhere"], "nowhere"),
    ("sync", ["nosuch"], "nosuch"),
    ("sync", ["foo=1"], "foo"),
    # benchmark.table
    ("table", ["results_dir=nowhere"], "nowhere"),
    ("table", ["--nosuch"], "--nosuch"),
    # benchmark.stepcost
    ("stepcost", ["--shape", "4,32"], "'4,32'"),
    ("stepcost", ["--batch", "abc"], "'abc'"),
    ("stepcost", ["--batch", "0"], "'0' is not an integer >= 1"),
    ("stepcost", ["--threads", "-1"], "'-1' is not an integer >= 0"),
    ("stepcost", ["--nosuch"], "--nosuch"),
    ("stepcost", ["--methods", "nosuch"], "nosuch"),
    # benchmark.config (regenerates configs/method: any argument is refused before it writes)
    ("config", ["--nosuch"], "--nosuch"),
    ("config", ["extra"], "extra"),
    # benchmark.flops
    ("flops", ["results_dir=nowhere"], "nowhere"),
    ("flops", ["nosuch=1"], "nosuch=1"),
    # benchmark.encode
    ("encode", ["--nosuch"], "--nosuch"),
    ("encode", ["data=digits", "out=latents", "vae=nowhere"], "data=digits"),
]

HELP = [(cli, ["--help"]) for cli in CLIS]


def _run(cli: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PATH": str(Path(sys.executable).parent)}
    env.pop("BENCHMARK_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", f"benchmark.{cli}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, tuple[subprocess.CompletedProcess, Path]]:
    """Every command of BAD and HELP, run concurrently; each in its own empty folder."""
    root = tmp_path_factory.mktemp("cli")
    rows = [(cli, args) for cli, args, _ in BAD] + HELP
    with ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2) * 2)) as pool:
        futures = {i: pool.submit(_run, cli, args, root / f"row{i}") for i, (cli, args) in enumerate(rows)}
    return {i: (f.result(), root / f"row{i}") for i, f in futures.items()}


@pytest.mark.parametrize("row", range(len(BAD)), ids=[f"{cli} {' '.join(args)}" for cli, args, _ in BAD])
def test_a_bad_command_line_is_one_error_line_exit_2_and_writes_nothing(results, row: int) -> None:
    cli, args, names = BAD[row]
    result, cwd = results[row]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and names in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("cli", CLIS)
def test_every_command_line_answers_help_with_exit_0(results, cli: str) -> None:
    result, cwd = results[len(BAD) + CLIS.index(cli)]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and f"benchmark.{cli}" in result.stdout.split("\n\n", 1)[0]
    assert result.stderr == "" and list(cwd.iterdir()) == []


def test_the_table_covers_every_command_line_with_forty_mistakes() -> None:
    assert len(BAD) >= 40
    assert {cli for cli, _, _ in BAD} == set(CLIS)
