"""MLflow mirror: a real sqlite store holds every run with its metrics and artifacts."""

from __future__ import annotations

from pathlib import Path

from benchmark.run import main


def test_mlflow_store_holds_training_and_evaluation_runs_with_metrics_and_grids(toy_overrides) -> None:
    from mlflow.tracking import MlflowClient

    assert main([*toy_overrides, "method=fm", "nfe=1,2"]) == 0
    results = Path(next(a.split("=", 1)[1] for a in toy_overrides if a.startswith("results_dir=")))
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fewstep-bench")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "training"]
    evals = [r for r in runs if r.data.tags.get("kind") == "evaluation"]
    assert len(parents) == 1 and len(evals) == 2
    parent = parents[0]
    assert parent.data.tags["method"] == "fm"
    history = client.get_metric_history(parent.info.run_id, "train_loss")
    assert len(history) >= 1 and all(m.value > 0 for m in history)
    sweeps = {r.data.tags["sweep"] for r in runs}
    assert len(sweeps) == 1 and "nfe=1,2" in parent.data.tags["sweep_overrides"]  # filterable by sweep
    for run in evals:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"swd", "mmd", "nfe_counted", "sec_per_sample"} <= set(run.data.metrics)
        assert run.data.metrics["nfe_counted"] == float(run.data.tags["nfe"])
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert len(artifacts) == 1 and artifacts[0].endswith(".png")
        local = Path(client.download_artifacts(run.info.run_id, artifacts[0]))
        assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun mirrors nothing twice
    assert main([*toy_overrides, "method=fm", "nfe=1,2"]) == 0
    assert len(client.search_runs([experiment.experiment_id])) == 3
