"""Mirror the results on disk to MLflow: ``python -m benchmark.sync [results_dir=DIR]
[tracking.uri=URI] [tracking.experiment=NAME]``.

Every finished training and every evaluation record under ``DIR/runs`` that has not yet
been mirrored to that tracking URI is logged (a parent run per training, nested runs per
evaluation), exactly as ``benchmark.run`` logs them, and so is every finished trial of the
Optuna studies under ``DIR/tune`` (children of their study's run, as ``benchmark.tune``
logs them).  Use it after a run whose tracking server was down, or to copy a results
folder into a team server.
"""

from __future__ import annotations

import json
import sys

from benchmark.schema import TrackingConfig, UserError, coerce_dataclass
from benchmark.store import Store
from benchmark.tracking import Tracker


def parse(argv: list[str]) -> tuple[Store, TrackingConfig]:
    results_dir, tracking = "results", {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"argument '{arg}' is not key=value; expected results_dir=DIR or tracking.uri=URI")
        if key == "results_dir":
            results_dir = value
        elif key.startswith("tracking."):
            tracking[key.split(".", 1)[1]] = value
        else:
            raise UserError(f"unknown key '{key}'; expected results_dir, tracking.uri or tracking.experiment")
    store = Store(results_dir)
    if not (store.root / "runs").is_dir():
        raise UserError(f"results_dir={results_dir} has no runs/ folder; expected the folder a "
                        f"benchmark.run wrote (default results)")
    return store, coerce_dataclass(TrackingConfig, tracking, "tracking")


def sync(store: Store, cfg: TrackingConfig) -> tuple[int, int, bool]:
    """Mirror what is missing; returns the trainings and evaluations now mirrored and
    whether the tracking store answered throughout."""
    tracker = Tracker(cfg, store)
    trainings = evaluations = 0
    for run_dir in sorted((store.root / "runs").iterdir()):
        config = run_dir / "config.json"
        if not (config.is_file() and store.is_trained(run_dir.name)):
            continue
        identity = json.loads(config.read_text())["identity"]
        summary = store.read_final_summary(run_dir.name)
        if tracker.log_training(run_dir.name, identity, summary["curve"], summary["seconds"]) is None:
            break
        trainings += 1
        for record_path in sorted((run_dir / "evals").glob("*.json")):
            if tracker.log_evaluation(run_dir.name, identity, json.loads(record_path.read_text())) is None:
                break
            evaluations += 1
        if tracker.down:
            break
    return trainings, evaluations, not tracker.down


def sync_studies(store: Store, cfg: TrackingConfig) -> tuple[int, bool]:
    """Mirror the finished trials of every study under ``tune/`` not mirrored yet; returns
    the count and whether the tracking store answered throughout."""
    count = 0
    for meta_path in sorted((store.root / "tune").glob("*/study.json")):
        from benchmark.tune import mirror_finished_trials  # optuna only when there are studies

        logged = mirror_finished_trials(json.loads(meta_path.read_text()), store, cfg)
        if logged is None:
            return count, False
        count += logged
    return count, True


def main(argv: list[str] | None = None) -> int:
    try:
        store, cfg = parse(sys.argv[1:] if argv is None else argv)
        trainings, evaluations, ok = sync(store, cfg)
        trials, ok_trials = sync_studies(store, cfg) if ok else (0, True)
        ok = ok and ok_trials
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tracker_uri = cfg.uri or store.mlflow_uri()
    if not ok:
        print(f"error: MLflow at {tracker_uri} did not answer; the records stay on disk: rerun when "
              f"it is up", file=sys.stderr)
        return 1
    print(f"mirrored {trainings} training(s), {evaluations} evaluation(s) and {trials} tuning trial(s) "
          f"to {tracker_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
