"""Trials as benchmark runs: a trial's overrides, its plan (the same planner and cache as
``benchmark.run``), its rungs, and :class:`TrialTask`, the picklable job a launcher runs for
it (train in segments, report each rung to the study, whose pruner may stop it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.config import compose_points
from benchmark.plan import EvalJob, Plan, TrainingJob, plan_points
from benchmark.schema import UserError
from benchmark.store import Store
from benchmark.tuning.space import build_pruner, open_storage


def format_value(value: Any) -> str:
    """A sampled value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def trial_overrides(base: list[str], params: dict, nfe: int) -> list[str]:
    return [*base, *(f"{k}={format_value(v)}" for k, v in params.items()), f"nfe={nfe}"]


def plan_trial(overrides: list[str]) -> tuple[Plan, TrainingJob, EvalJob]:
    plan = plan_points(compose_points(overrides))
    return plan, plan.trainings[0], plan.evaluations[0]


def rung_steps(report_every: int, steps: int) -> list[int]:
    """Training steps at which a trial reports its intermediate objective."""
    return list(range(report_every, steps, report_every)) if report_every else []


@contextlib.contextmanager
def flock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (its content: who holds it); yields False at once
    when ``blocking`` is off and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.uname().nodename}:{os.getpid()}\n")
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class TrialTask:
    """One trial, run where the launcher puts it: train in segments, evaluate the objective
    at each rung and report it to the study (whose pruner may stop the trial there), then
    train to the end and evaluate the final checkpoint.  Every piece is cached on disk, so
    running a trial again (a killed driver's trial) redoes nothing that finished."""

    job: TrainingJob
    objective: EvalJob
    metric: str
    rungs: list[int]
    storage: str
    study_name: str
    trial_id: int
    pruner: dict
    study_dir: str
    results_dir: str
    threads: int = 0

    def __call__(self) -> dict:
        from benchmark.launch import set_threads

        set_threads(self.threads)
        # a second job of the same trial (a killed driver's orphan still running) waits
        with flock(Path(self.study_dir) / "locks" / f"trial-{self.trial_id}.lock"):
            return self._run()

    def _run(self) -> dict:
        from benchmark.evaluate import evaluate
        from benchmark.train import load_checkpoint, load_trained, train

        store = Store(self.results_dir)
        trial = None
        for step in self.rungs:
            ev = self.objective.at_step(step)
            if not store.has_eval(ev.train_key, ev.key, rung=True):
                if store.is_trained(self.job.key):
                    continue  # trained to the end already: this checkpoint is gone
                train(self.job, store, stop_after=step)
                loaded = load_checkpoint(self.job, store, step)
                if loaded is None:
                    continue  # another process trained past this step meanwhile
                evaluate(self.job, ev, loaded[0], store, loaded[1])
            value = metric_value(store.read_eval(ev.train_key, ev.key, rung=True), self.metric)
            trial = trial or open_trial(self.storage, self.study_name, self.trial_id, self.pruner)
            trial.report(value, step)
            if trial.should_prune():
                return {"state": "pruned", "step": step, "value": value}
        train(self.job, store)
        if not store.has_eval(self.objective.train_key, self.objective.key):
            trainee, final = load_trained(self.job, store)
            evaluate(self.job, self.objective, trainee, store, final)
        record = store.read_eval(self.objective.train_key, self.objective.key)
        return {"state": "complete", "value": metric_value(record, self.metric)}


def metric_value(record: dict, metric: str) -> float:
    value = record["metrics"].get(metric)
    if not isinstance(value, (int, float)):
        raise UserError(f"evaluation {record['eval_key']} recorded no scalar '{metric}'; expected one of: "
                        f"{', '.join(k for k, v in record['metrics'].items() if isinstance(v, (int, float)))}")
    return float(value)


def open_trial(storage: str, study_name: str, trial_id: int, pruner: dict):
    """The running trial ``trial_id`` of a study, opened where its job runs, to report to."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage), pruner=build_pruner(pruner))
    return optuna.trial.Trial(study, trial_id)
