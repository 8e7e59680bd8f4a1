"""Mirror the results on disk to MLflow: ``python -m benchmark.sync [results_dir=DIR]
[tracking.uri=URI] [tracking.experiment=NAME]``.

Every finished training and every evaluation record under ``DIR/runs`` that is not yet in
that tracking store is logged (a parent run per training, nested runs per evaluation),
exactly as ``benchmark.run`` logs them, and so is every finished trial of the Optuna
studies under ``DIR/tune`` (children of their study's run, as ``benchmark.tune`` logs
them).  Runs are found by their keys (tags), so syncing again logs nothing twice and the
counts printed are what this call really logged.  Use it after a run whose tracking server
was down, to copy a results folder into a team server, or to rebuild a broken
``mlflow.db`` (move it aside, then sync).  A record that cannot be read is moved aside
(one line) and skipped.
"""

from __future__ import annotations

import sys

from benchmark.cli import entry
from benchmark.schema import Failure, TrackingConfig, UserError, coerce_dataclass
from benchmark.store import Store
from benchmark.tracking import Tracker


def parse(argv: list[str]) -> tuple[Store, TrackingConfig]:
    results_dir, tracking = "results", {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"argument '{arg}' is not key=value; expected results_dir=DIR or tracking.uri=URI")
        if key == "results_dir":
            if not value.strip():
                raise UserError("results_dir= is empty; expected the folder a benchmark.run wrote "
                                "(default results)")
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


def sync(store: Store, cfg: TrackingConfig, tracker: Tracker | None = None) -> bool:
    """Mirror what is missing; False when the tracking store failed (``tracker.problem``
    says why).  ``tracker.logged`` counts the runs this call created or finished."""
    tracker = tracker or Tracker(cfg, store)
    for run_dir in sorted((store.root / "runs").iterdir()):
        if not (run_dir.is_dir() and store.is_trained(run_dir.name)):
            continue
        config = store.read_config(run_dir.name)
        if config is None:
            continue
        records = [store.read_record(p) for p in sorted((run_dir / "evals").glob("*.json"))]
        if not tracker.mirror_run(run_dir.name, config["identity"], [r for r in records if r is not None]):
            return False
    return True


def sync_studies(store: Store, cfg: TrackingConfig) -> tuple[int, str]:
    """Mirror the finished trials of every study under ``tune/`` not mirrored yet; returns
    the count logged and, when the tracking store failed, why ("" otherwise)."""
    count = 0
    for meta_path in sorted((store.root / "tune").glob("*/study.json")):
        # optuna only when there are studies
        from benchmark.store import read_record
        from benchmark.tuning.mirror import mirror_finished_trials

        meta = read_record(meta_path, ("study", "storage"), then="its trials are not mirrored")
        if meta is None:
            continue
        logged, problem = mirror_finished_trials(meta, store, cfg)
        count += logged
        if problem:
            return count, problem
    return count, ""


USAGE = "usage: python -m benchmark.sync [results_dir=DIR] [tracking.uri=URI] [tracking.experiment=NAME] [--help]"


def main(argv: list[str] | None = None) -> int:
    return entry(_main, argv, USAGE + "\n\n" + (__doc__ or "").strip())


def _main(argv: list[str]) -> int:
    store, cfg = parse(argv)
    if not cfg.enabled:
        raise UserError("tracking.enabled=false leaves nothing to do; expected tracking.enabled=true "
                        "(the default) to mirror the records")
    tracker = Tracker(cfg, store, quiet=True)
    ok = sync(store, cfg, tracker)
    trials, problem = sync_studies(store, cfg) if ok else (0, tracker.problem)
    counts = (f"{tracker.logged['training']} training(s), {tracker.logged['evaluation']} evaluation(s) "
              f"and {trials} tuning trial(s)")
    if not ok or problem:
        raise Failure(f"{problem or tracker.problem}; mirrored {counts} before that")
    print(f"mirrored {counts} to {tracker.uri} (the others were there already)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
