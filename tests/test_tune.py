"""Optuna tuning: trials are benchmark runs launched in parallel, the study survives a killed
driver, pruning stops hopeless trials, every trial reaches MLflow, the best config runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy.exc
import yaml

from benchmark.tune import main as tune_main
from tests.conftest import REPO, run_cli

# Two moons with the MLP: a trial takes seconds.  lr 1e-6 leaves the network at its
# initialisation, so its intermediate SWD is far worse than a trained one's: the median
# pruner (one finished trial is enough) stops it at its first rung.
GOOD, BAD = 3e-3, 1e-6
TOY_BASE = ["method=fm", "data=two_moons", "model=mlp", "train=toy", "train.steps=150",
            "train.warmup_steps=10", "train.progress=false", "eval.num_samples=300", "eval.ema=raw"]


def write_space(tmp_path: Path, name: str = "space", **fields) -> Path:
    spec = {"metric": "swd", "nfe": 2, "n_trials": 2, "report_every": 0, "base": TOY_BASE,
            "space": {"train.lr": {"type": "categorical", "choices": [GOOD, BAD]}},
            "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "median", "n_startup_trials": 1},
            **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_tune(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "benchmark.tune", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def load(results: Path, study_name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name, storage=f"sqlite:///{results / 'optuna.db'}")


# ----------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


@pytest.mark.parametrize("space, extra, expected", [
    ({"method.nope": {"type": "float", "low": 0.0, "high": 1.0}}, [], "unknown key 'method.nope'"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}, [], "low=0.1 > high=0.01; expected low <= high"),
    ({"train.lr": {"type": "gaussian", "low": 0.0, "high": 1.0}}, [],
     "unknown distribution type='gaussian'; expected one of: float, int, categorical"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, [], "log=true needs low > 0"),
    ({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "scale": 2}}, [], "unknown field 'scale'"),
    ({"train.weight_decay": {"type": "float", "low": -0.5, "high": 0.5}}, [],
     "at -0.5: train.weight_decay=-0.5 is out of range; expected a value >= 0"),
    (None, ["tune.n_trails=3"], "unknown key 'tune.n_trails'"),
    (None, ["tune.pruner.name=magic"], "tune.pruner.name='magic' is not a known pruner"),
    (None, ["tune.pruner.n_startup=2"], "tune.pruner.n_startup is not an option of the median pruner"),
    (None, ["tune.metric=fd"], "tune.metric=fd is not recorded for data=two_moons; expected one of: sw2, swd"),
    (None, ["seed=0,1"], "the base configuration holds a sweep"),
    (None, ["train.lr=0.01"], "train.lr is both tuned"),
    (None, ["nfe=4"], "expected tune.nfe=N"),
    (None, ["tune.report_every=150"], "tune.report_every=150 >= train.steps=150"),
])
def test_a_malformed_search_space_is_one_clear_line_and_exit_2(tmp_path, capsys, space, extra, expected) -> None:
    fields = {"space": space} if space else {}
    path = write_space(tmp_path, **fields)
    results = tmp_path / "results"
    code = tune_main([f"tune={path}", f"results_dir={results}", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not results.exists()  # no study, no run folder


def test_bad_tune_arguments_from_the_shell_exit_2_without_a_traceback(tmp_path) -> None:
    missing = run_tune(f"results_dir={tmp_path}")
    assert missing.returncode == 2 and "expected exactly one tune=<space>, one of: fm_toy" in missing.stderr
    unknown = run_tune("tune=nope")
    assert unknown.returncode == 2 and "unknown tune 'nope'; expected one of:" in unknown.stderr
    for proc in (missing, unknown):
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_every_shipped_search_space_plans_in_a_dry_run() -> None:
    for name in ("meanflow_digits", "fm_toy"):
        proc = run_tune(f"tune={name}", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert "search space:" in proc.stdout and "rungs at steps" in proc.stdout
    digits = run_tune("tune=meanflow_digits", "--dry-run").stdout
    assert "minimize fd at nfe=1" in digits and "method.ratio_r_neq_t: float [0.1, 1.0]" in digits


# ----------------------------------------------------------------------------------------
# The study


@pytest.mark.slow
def test_a_study_runs_in_parallel_survives_a_killed_driver_prunes_and_mirrors_every_trial(tmp_path) -> None:
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    results = tmp_path / "results"
    plan = [{"train.lr": GOOD, "method.time_mean": 0.0}, {"train.lr": GOOD, "method.time_mean": -0.4},
            {"train.lr": BAD, "method.time_mean": 0.0}, {"train.lr": BAD, "method.time_mean": -0.4},
            {"train.lr": GOOD, "method.time_mean": 0.5}]
    path = write_space(tmp_path, n_trials=5, report_every=50, study="toy", enqueue=plan, nfe=8, space={
        "train.lr": {"type": "categorical", "choices": [GOOD, BAD]},
        "method.time_mean": {"type": "categorical", "choices": [0.0, -0.4, 0.5]}})
    args = [f"tune={path}", "launcher=local", "launcher.max_parallel=2", "launcher.timeout_min=10",
            f"results_dir={results}"]

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    driver = subprocess.Popen([sys.executable, "-m", "benchmark.tune", *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    killed_with = []
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.3)
        if (results / "optuna.db").is_file():
            try:
                trials = load(results, "toy").get_trials(deepcopy=False)
            except (KeyError, sqlalchemy.exc.SQLAlchemyError):
                # the database exists, the study (or the schema the driver is writing) not yet:
                # opening it while the driver creates it races on the schema version row
                continue
            states = [t.state for t in trials]
            if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                killed_with = trials
                break
    assert killed_with, "the driver finished or stalled before a trial completed with another running"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local trial jobs
    driver.wait()
    left_running = [t.number for t in load(results, "toy").get_trials() if t.state == TrialState.RUNNING]
    assert left_running

    rerun = run_tune(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming trial(s) {', '.join(map(str, left_running))}" in rerun.stdout
    trials = load(results, "toy").get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]  # none lost, none duplicated
    assert [t.params for t in trials] == plan  # the resumed trials kept their parameters
    states = [t.state for t in trials]
    assert TrialState.FAIL not in states and TrialState.RUNNING not in states
    assert states[2] == states[3] == TrialState.PRUNED  # the untrained ones, at their first rung
    assert all(t.last_step == 50 for t in trials[2:4])
    assert states[0] == states[1] == TrialState.COMPLETE
    assert all(0 < t.value < 1 for t in trials if t.state == TrialState.COMPLETE)
    # two trials ran at once: some pair of trials overlapped in time
    spans = [(t.datetime_start, t.datetime_complete) for t in trials]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    # a second rerun has nothing left to do
    again = run_tune(*args)
    assert again.returncode == 0 and "submitted" not in again.stdout
    assert len(load(results, "toy").trials) == 5

    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fewstep-bench")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    study_runs = [r for r in runs if r.data.tags.get("kind") == "study"]
    trial_runs = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(study_runs) == 1
    assert sorted(int(r.data.tags["optuna_trial"]) for r in trial_runs) == [0, 1, 2, 3, 4]
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {study_runs[0].info.run_id}
    assert {r.data.tags["optuna_study"] for r in trial_runs} == {"toy"}
    pruned = [r for r in trial_runs if r.data.tags["state"] == "PRUNED"]
    assert len(pruned) == states.count(TrialState.PRUNED) >= 2
    assert all("swd_intermediate" in r.data.metrics for r in pruned)
    assert {r.data.tags["optuna_trial"]: r.data.tags["state"] for r in trial_runs} == \
        {str(t.number): t.state.name for t in trials}

    folder = results / "tune" / "toy"
    for name in ("trials.csv", "best.md", "best.yaml", "history.png", "intermediate.png"):
        assert (folder / name).is_file(), name
    best = yaml.safe_load((folder / "best.yaml").read_text())
    best_trial = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert best["trial"] == best_trial.number and best["value"] == pytest.approx(best_trial.value)
    dry = run_cli("--config", str(folder / "best.yaml"), "nfe=1,2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "[cached]" in dry.stdout.split("evaluations:")[0]  # the tuned run's checkpoint is reused
    assert f'"lr": {best["params"]["train.lr"]}' in dry.stdout


@pytest.mark.slow
def test_an_identical_trial_is_not_retrained_and_a_failed_one_is_recorded_with_its_reason(tmp_path) -> None:
    """Trial 1 repeats trial 0 (its result comes from the cache, nothing launched); trial 2
    diverges (NaN at step 1 without gradient clipping) and fails with that reason; trial 3
    still runs: the study goes on."""
    from optuna.trial import TrialState

    results = tmp_path / "results"
    path = write_space(tmp_path, n_trials=4, study="mixed",
                       base=[*(o for o in TOY_BASE if not o.startswith("train.steps=")), "train.grad_clip=0",
                             "train.steps=60"],
                       space={"train.lr": {"type": "categorical", "choices": [GOOD, 1e9, 1e-3]}},
                       enqueue=[{"train.lr": GOOD}, {"train.lr": GOOD}, {"train.lr": 1e9}, {"train.lr": 1e-3}])
    proc = run_tune(f"tune={path}", "launcher=local", "launcher.max_parallel=1", "launcher.timeout_min=10",
                    f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr
    assert "trial 1: swd=" in proc.stdout and "(cached run" in proc.stdout
    assert proc.stdout.count("submitted trial") == 3  # trial 1 was never launched
    trials = load(results, "mixed").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE]
    assert trials[1].value == trials[0].value
    assert "TrainingDiverged: training loss is nan at step 1" in trials[2].user_attrs["fail_reason"]
    assert "1 trial(s) failed" in proc.stdout
    assert len(list(results.glob("runs/*/final.pt"))) == 2  # three launched, two trainings finished


# ----------------------------------------------------------------------------------------
# The exported config


def test_run_config_file_overrides_are_taken_and_the_command_line_wins(tmp_path) -> None:
    config = tmp_path / "best.yaml"
    config.write_text(yaml.safe_dump({"overrides": [*TOY_BASE, "train.lr=0.002", f"results_dir={tmp_path}"]}))
    dry = run_cli("--config", str(config), "train.lr=0.005", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert '"lr": 0.005' in dry.stdout and '"steps": 150' in dry.stdout and "data=two_moons" in dry.stdout


@pytest.mark.parametrize("content, expected", [
    (None, "no such file; expected a YAML file with an overrides list"),
    ("overrides: 3\n", "has no overrides list of key=value strings"),
    ("a: [\n", "is not valid YAML"),
])
def test_a_bad_run_config_file_is_one_line_and_exit_2(tmp_path, content, expected) -> None:
    config = tmp_path / "best.yaml"
    if content is not None:
        config.write_text(content)
    proc = run_cli("--config", str(config), "--dry-run")
    assert proc.returncode == 2 and expected in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("pruner", [{"name": "median", "n_startup_trials": 1},
                                    pytest.param({"name": "successive_halving", "min_resource": 50,
                                                  "reduction_factor": 2}, marks=pytest.mark.slow)])
def test_inline_trials_run_one_after_another_with_journal_storage_and_a_pruner(tmp_path, capsys, pruner) -> None:
    """launcher=inline: each trial is told before the next is asked, so the pruner (the
    median of one finished trial, or successive halving keeping the better half at step 50)
    deterministically stops the untrained trial at its first rung; the study lives in
    Optuna's journal file, which the trial also reports to."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    results, journal = tmp_path / "results", tmp_path / "journal" / "study.log"
    path = write_space(tmp_path, n_trials=2, report_every=50, study="inline", pruner=pruner, nfe=8,
                       enqueue=[{"train.lr": GOOD}, {"train.lr": BAD}])
    code = tune_main([f"tune={path}", f"tune.storage=journal://{journal}", f"results_dir={results}",
                      "tracking.enabled=false"])
    out = capsys.readouterr().out
    assert code == 0
    assert "trial 1: pruned at step 50" in out
    study = optuna.load_study(study_name="inline", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert sorted(trials[0].intermediate_values) == [50, 100] and list(trials[1].intermediate_values) == [50]
    assert trials[1].intermediate_values[50] > trials[0].intermediate_values[50]
    assert not (results / "optuna.db").exists() and not (results / "mlflow.db").exists()
    # the pruned trial's run stays resumable at its rung; the completed one is final
    assert len(list(results.glob("runs/*/final.pt"))) == 1 and len(list(results.glob("runs/*/state.pt"))) == 2
    assert len(list(results.glob("runs/*/rungs/*.json"))) == 3 and len(list(results.glob("runs/*/evals/*.json"))) == 1


def test_benchmark_sync_mirrors_a_study_run_without_tracking(tmp_path, capsys) -> None:
    """A study run with tracking off (or against a server that was down) reaches MLflow
    later through benchmark.sync, once: its runs and its trials under the study's run."""
    from mlflow.tracking import MlflowClient

    from benchmark.sync import main as sync_main

    results = tmp_path / "results"
    path = write_space(tmp_path, n_trials=2, study="later", enqueue=[{"train.lr": GOOD}, {"train.lr": 1e-3}],
                       space={"train.lr": {"type": "categorical", "choices": [GOOD, 1e-3]}})
    assert tune_main([f"tune={path}", f"results_dir={results}", "tracking.enabled=false"]) == 0
    assert not (results / "mlflow.db").exists()
    capsys.readouterr()
    assert sync_main([f"results_dir={results}"]) == 0
    assert "mirrored 2 training(s), 2 evaluation(s) and 2 tuning trial(s)" in capsys.readouterr().out
    assert sync_main([f"results_dir={results}"]) == 0
    assert "mirrored 0 training(s), 0 evaluation(s) and 0 tuning trial(s)" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fewstep-bench").experiment_id])
    kinds = sorted(r.data.tags["kind"] for r in runs)
    assert kinds == ["evaluation"] * 2 + ["study"] + ["training"] * 2 + ["trial"] * 2
    trials = {r.data.tags["optuna_trial"]: r for r in runs if r.data.tags["kind"] == "trial"}
    assert sorted(trials) == ["0", "1"] and all(r.data.tags["optuna_study"] == "later" for r in trials.values())
    assert "swd_nfe2" in trials["0"].data.metrics


@pytest.mark.slow
def test_the_report_notebook_shows_each_study_with_its_best_trials_and_plots(tmp_path, capsys) -> None:
    from benchmark import report

    results = tmp_path / "results"
    path = write_space(tmp_path, n_trials=2, study="shown", enqueue=[{"train.lr": GOOD}, {"train.lr": 1e-3}],
                       space={"train.lr": {"type": "categorical", "choices": [GOOD, 1e-3]}})
    assert tune_main([f"tune={path}", f"results_dir={results}", "tracking.enabled=false"]) == 0
    assert report.main([f"results_dir={results}", f"notebook_dir={tmp_path / 'notebooks'}"]) == 0
    page = (tmp_path / "notebooks" / "benchmark_report.html").read_text()
    assert "Tuning studies" in page and "Study <code>shown</code>" in page
    assert "swd @ 2 NFE" in page and "2 trials: 2 complete, 0 pruned, 0 failed" in page
    import base64

    for name in ("history", "importance"):  # embedded as written by the tuner
        png = (results / "tune" / "shown" / f"{name}.png").read_bytes()
        assert base64.b64encode(png).decode()[:2000] in page, name
