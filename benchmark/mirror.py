"""What ``benchmark.run`` and ``benchmark.tune`` both do around a run: write its folder's
``config.json`` before it trains, and mirror its finished training and evaluations to
MLflow afterwards.  Both entry points import it from here (neither imports the other).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmark.store import Store
from benchmark.tracking import Tracker, source_info

if TYPE_CHECKING:
    from benchmark.plan import Plan, TrainingJob


def prepare_run_folder(store: Store, job: TrainingJob) -> None:
    """The run folder's ``config.json``: the training identity and, for a run about to
    train, the git commit of the code that trains it (MLflow's source tags)."""
    if not store.is_trained(job.key):
        store.write_config(job.key, {"identity": job.identity, "source": source_info()})
    elif store.read_config(job.key) is None:  # moved aside as corrupt: the identity is known
        store.write_config(job.key, {"identity": job.identity})


def mirror(plan: Plan, store: Store, sweep: str = "") -> None:
    """Mirror finished trainings and evaluations to MLflow (idempotent; never fatal)."""
    trackers: dict[tuple, Tracker] = {}
    for job in plan.trainings:
        if not (job.config.tracking.enabled and store.is_trained(job.key)):
            continue
        tracker = trackers.setdefault(tuple(vars(job.config.tracking).values()),
                                      Tracker(job.config.tracking, store, sweep))
        records = [store.read_record(store.eval_path(ev.train_key, ev.key))
                   for ev in plan.evaluations if ev.train_key == job.key]
        tracker.mirror_run(job.key, job.identity, [r for r in records if r is not None])
