"""MLflow mirror: a real sqlite store holds every run once, found by its key; a copied
results folder keeps to itself; a broken store says how to get out; sync counts truly."""

from __future__ import annotations

import datetime
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmark.run import main
from benchmark.store import Store
from benchmark.sync import main as sync_main
from benchmark.tracking import readable_grid
from tests.conftest import REPO

SWEEP = ["data=gaussian1d", "model=mlp", "train=toy", "train.steps=40", "train.ckpt_every=20",
         "train.progress=false", "eval.num_samples=200", "method=fm", "nfe=1,2"]


def sync_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark.sync", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def client_of(results: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")


def all_runs(results: Path) -> list:
    """Every run of the suite's experiment, deleted ones included."""
    from mlflow.entities import ViewType

    client = client_of(results)
    experiment = client.get_experiment_by_name("fewstep-bench")
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy sweep (one training, two evaluations) mirrored to the folder's sqlite store."""
    results = tmp_path_factory.mktemp("mirrored") / "results"
    assert main([*SWEEP, f"results_dir={results}"]) == 0
    return results


def test_mlflow_store_holds_training_and_evaluation_runs_with_metrics_and_grids(mirrored: Path) -> None:
    client = client_of(mirrored)
    runs = all_runs(mirrored)
    parents = [r for r in runs if r.data.tags.get("kind") == "training"]
    evals = [r for r in runs if r.data.tags.get("kind") == "evaluation"]
    assert len(parents) == 1 and len(evals) == 2
    parent = parents[0]
    assert parent.data.tags["method"] == "fm" and parent.info.status == "FINISHED"
    history = client.get_metric_history(parent.info.run_id, "train_loss")
    assert len(history) == 1 and history[0].step == 40 and history[0].value > 0
    sweeps = {r.data.tags["sweep"] for r in runs}
    assert len(sweeps) == 1 and "nfe=1,2" in parent.data.tags["sweep_overrides"]  # filterable by sweep
    for run in evals:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert {"swd", "mmd", "nfe_counted", "sec_per_sample"} <= set(run.data.metrics)
        assert run.data.metrics["nfe_counted"] == float(run.data.tags["nfe"])
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert len(artifacts) == 1 and artifacts[0].endswith(".png")
        local = Path(client.download_artifacts(run.info.run_id, artifacts[0]))
        assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_have_readable_unique_names_real_times_git_source_and_the_dataset(mirrored: Path) -> None:
    runs = all_runs(mirrored)
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == 3
    training = next(r for r in runs if r.data.tags["kind"] == "training")
    key = training.data.tags["train_key"]
    assert training.info.run_name == f"fm mlp gaussian1d [{key}]"
    assert sorted(n for n in names if "nfe=" in n) == sorted(
        f"fm mlp gaussian1d nfe={r.data.tags['nfe']} w=1 ema=0.1 [{r.data.tags['eval_key']}]"
        for r in runs if r.data.tags["kind"] == "evaluation")
    summary = Store(mirrored).read_final_summary(key)
    # the training's real span: it ended when final.pt was written, after its training seconds
    assert training.info.end_time == round(summary["end_time"] * 1000)
    assert training.info.end_time - training.info.start_time == pytest.approx(summary["seconds"] * 1000, abs=2)
    for run in runs:
        record = next((r for r in map(Store.read_record, mirrored.glob("runs/*/evals/*.json"))
                       if r["eval_key"] == run.data.tags.get("eval_key")), None)
        if record is not None:  # an evaluation ends at its record's date, after its seconds
            date = datetime.datetime.fromisoformat(record["provenance"]["date"]).timestamp()
            assert run.info.end_time == round(date * 1000)
            assert run.info.end_time - run.info.start_time == round(
                1000 * (record["sample_seconds"] + record["metric_seconds"]))
            assert run.data.tags["mlflow.source.git.commit"] == record["provenance"]["git"]
        assert run.data.tags["mlflow.source.name"] == "benchmark.run"
        assert len(run.inputs.dataset_inputs) == 1
        dataset = run.inputs.dataset_inputs[0].dataset
        assert dataset.name == f"gaussian1d-{dataset.digest}" and len(dataset.digest) == 12
    config = Store(mirrored).read_config(key)
    assert training.data.tags["mlflow.source.git.commit"] == config["source"]["git_commit"]


def test_a_rerun_and_a_sync_log_nothing_twice(mirrored: Path, capsys) -> None:
    before = {r.info.run_id for r in all_runs(mirrored)}
    assert main([*SWEEP, f"results_dir={mirrored}"]) == 0
    assert sync_main([f"results_dir={mirrored}"]) == 0
    assert "mirrored 0 training(s), 0 evaluation(s) and 0 tuning trial(s)" in capsys.readouterr().out
    assert {r.info.run_id for r in all_runs(mirrored)} == before


def test_a_copied_results_folder_reruns_without_new_runs_and_never_writes_to_the_original(
        mirrored: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "results"
    shutil.copytree(mirrored, copy)
    original = snapshot(mirrored)
    runs = {r.info.run_id for r in all_runs(copy)}
    assert main([*SWEEP, f"results_dir={copy}"]) == 0  # fully cached
    assert {r.info.run_id for r in all_runs(copy)} == runs  # no new MLflow run
    ours = (copy / "mlartifacts").resolve().as_uri()
    assert client_of(copy).get_experiment_by_name("fewstep-bench").artifact_location == ours
    assert all(r.info.artifact_uri.startswith(ours) for r in all_runs(copy))  # the copied runs follow
    assert main([*SWEEP[:-1], "nfe=4", f"results_dir={copy}"]) == 0  # a new point, in the copy only
    new = [r for r in all_runs(copy) if r.info.run_id not in runs]
    assert len(new) == 1 and new[0].info.artifact_uri.startswith(ours)
    assert len(list((copy / "mlartifacts").glob(f"{new[0].info.run_id}/artifacts/samples/*.png"))) == 1
    assert snapshot(mirrored) == original  # not one byte written into the original folder


def test_a_broken_store_is_one_line_with_the_way_out_and_sync_rebuilds_it(
        toy_overrides: list[str], capsys) -> None:
    results = Path(next(a.split("=", 1)[1] for a in toy_overrides if a.startswith("results_dir=")))
    args = [*toy_overrides, "nfe=1,2"]
    assert main([*args, "tracking.enabled=false"]) == 0
    db = results / "mlflow.db"
    with sqlite3.connect(db) as con:  # what racing schema creations left: a table, no schema version
        con.execute("CREATE TABLE latest_metrics (key VARCHAR(250))")
    capsys.readouterr()
    assert main(args) == 0  # the records are the truth: the run still succeeds
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow")
    assert f"mv {db} {db}.broken" in warnings[0] and f"python -m benchmark.sync results_dir={results}" in warnings[0]
    assert sync_main([f"results_dir={results}"]) == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(errors) == 1 and f"mv {db} {db}.broken" in errors[0]
    db.rename(db.with_name("mlflow.db.broken"))  # the way out, as said, in a new process (as a user would)
    garbage = next(results.glob("runs/*/evals/*.json"))
    garbage.write_text('{"eval_key": "trunc')  # a torn record is skipped, not fatal
    rebuilt = sync_cli(f"results_dir={results}")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "mirrored 1 training(s), 1 evaluation(s) and 0 tuning trial(s)" in rebuilt.stdout
    assert rebuilt.stderr.startswith(f"warning: {garbage} is unreadable")
    with sqlite3.connect(db) as con:  # the new store (this process's MLflow still holds the old file open)
        assert con.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0] == 2


def test_tiny_sample_grids_are_upscaled_with_sharp_pixels(tmp_path: Path) -> None:
    grid = Image.new("L", (90, 72))  # the 8x8-digit grid: 10 classes x 8 rows of 9-px cells
    grid.putpixel((0, 0), 255)
    grid.save(tmp_path / "g.png")
    (tmp_path / "out").mkdir()
    big = Image.open(readable_grid(tmp_path / "g.png", tmp_path / "out"))
    assert big.size == (360, 288)  # x4: the longer side reaches 320 px
    assert sorted(set(big.tobytes())) == [0, 255] and big.getpixel((3, 3)) == 255 and big.getpixel((4, 4)) == 0
    Image.new("L", (400, 400)).save(tmp_path / "large.png")
    assert readable_grid(tmp_path / "large.png", tmp_path / "out") == tmp_path / "large.png"


def stat_of(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def runs_by_key(results: Path) -> dict[str, list]:
    """Every run (deleted ones included) by its key: train_key for trainings, eval_key for evaluations."""
    out: dict[str, list] = {}
    for run in all_runs(results):
        tags = run.data.tags
        out.setdefault(tags["eval_key"] if tags["kind"] == "evaluation" else tags["train_key"], []).append(run)
    return out


def test_force_recomputes_only_the_named_point_from_the_same_checkpoint_and_updates_its_one_run(
        mirrored: Path, tmp_path: Path, capsys) -> None:
    results = tmp_path / "results"
    shutil.copytree(mirrored, results)  # the module's sweep (nfe=1,2), in a folder of this test's own
    (final,) = results.glob("runs/*/final.pt")
    records = {Store.read_record(p)["nfe"]: p for p in results.glob("runs/*/evals/*.json")}
    checkpoint, other = stat_of(final), stat_of(records[2])
    first = runs_by_key(results)
    key1 = Store.read_record(records[1])["eval_key"]
    for _ in range(2):
        before = stat_of(records[1])
        assert main([*SWEEP[:-1], "nfe=1", f"results_dir={results}", "--force"]) == 0
        assert stat_of(final) == checkpoint  # same bytes, same mtime: not retrained
        assert stat_of(records[1])[1] != before[1]  # the named point was computed again
        assert stat_of(records[2]) == other  # the point not named is untouched
        now = runs_by_key(results)
        assert {k: [r.info.run_id for r in v] for k, v in now.items()} == \
            {k: [r.info.run_id for r in v] for k, v in first.items()}  # one run per key, the same ones
        (run,) = now[key1]
        record = Store.read_record(records[1])
        assert run.info.lifecycle_stage == "active" and run.info.status == "FINISHED"
        assert run.data.tags["record_digest"] != first[key1][0].data.tags["record_digest"]
        history = client_of(results).get_metric_history(run.info.run_id, "sec_per_sample")
        assert [m.value for m in history] == [record["sec_per_sample"]]  # the new record's, only
        date = datetime.datetime.fromisoformat(record["provenance"]["date"]).timestamp()
        assert run.info.end_time == round(date * 1000)

    capsys.readouterr()
    assert main([*SWEEP[:-1], "nfe=1", f"results_dir={results}", "--force-train"]) == 0
    out = capsys.readouterr().out
    assert stat_of(final) != checkpoint  # retrained: a new final.pt
    assert records[1].is_file() and not records[2].exists()  # the stale point of the old checkpoint is gone
    key2 = first.keys() - {key1, final.parent.name}
    assert f"removed 1 evaluation(s) of training {final.parent.name}" in out and key2.pop() in out
    now = runs_by_key(results)
    assert all(len(v) == 1 for v in now.values()) and now.keys() == first.keys()
    stages = {k: v[0].info.lifecycle_stage for k, v in now.items()}
    assert sorted(stages.values()) == ["active", "active", "deleted"] and stages[key1] == "active"
    training = now[final.parent.name][0]
    assert training.info.run_id == first[final.parent.name][0].info.run_id
    summary = Store(results).read_final_summary(final.parent.name)
    assert training.info.end_time == round(summary["end_time"] * 1000)
    assert len(client_of(results).get_metric_history(training.info.run_id, "train_loss")) == 1

    assert main([*SWEEP, f"results_dir={results}"]) == 0  # naming the removed point computes it again
    again = runs_by_key(results)
    assert all(len(v) == 1 and v[0].info.lifecycle_stage == "active" for v in again.values())
    assert {k: v[0].info.run_id for k, v in again.items()} == {k: v[0].info.run_id for k, v in first.items()}
