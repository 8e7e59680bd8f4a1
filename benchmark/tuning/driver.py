"""The driver: run a study to ``n_trials`` finished trials.  It asks the sampler for a
trial's parameters, plans the trial as a benchmark run, answers it from the cache when an
identical run finished, else submits a :class:`~benchmark.tuning.trial.TrialTask` through
the launcher, tells the study each outcome and mirrors it; one driver per study (a lock).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from benchmark.mirror import prepare_run_folder
from benchmark.schema import UserError
from benchmark.store import atomic_write_json
from benchmark.tuning.mirror import finished_states, mirror_missed, mirror_trial, study_tracker
from benchmark.tuning.outputs import write_outputs
from benchmark.tuning.study import Flight, StudyHandle, Tuning, open_study
from benchmark.tuning.trial import (
    TrialTask,
    flock,
    metric_value,
    plan_trial,
    rung_steps,
    trial_overrides,
)


def drive(tuning: Tuning) -> int:
    """Run the study to ``n_trials`` finished trials; returns the failed-trial count of this call."""
    from optuna.trial import TrialState

    from benchmark.launch import Pool, job_threads

    handle = open_study(tuning)
    study = handle.study
    atomic_write_json(tuning.study_dir / "study.json", tuning.meta())  # benchmark.sync finds it here
    with flock(tuning.study_dir / "driver.lock", blocking=False) as mine:
        if not mine:
            holder = (tuning.study_dir / "driver.lock").read_text().strip()
            raise UserError(f"study {tuning.study_name} is being driven by another benchmark.tune ({holder}); "
                            f"expected one driver per study: wait for it, or give this one tune.study=OTHER")
        tracker = study_tracker(tuning)
        launcher = tuning.base_config.launcher
        pool = Pool(launcher, Path(launcher.folder) if launcher.folder else tuning.store.root / "submitit")
        threads = job_threads(launcher)
        # trials a killed driver left RUNNING: run them again under their own numbers
        orphans = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if orphans:
            print(f"resuming trial(s) {', '.join(map(str, orphans))} left running by a stopped driver")
        flights: dict[str, Flight] = {}
        failed = 0
        print(f"study {tuning.study_name}: {tuning.cfg.metric} at nfe={tuning.cfg.nfe} ({tuning.direction}), "
              f"{tuning.cfg.n_trials} trials, storage {tuning.storage}", flush=True)

        def finished_count() -> int:
            return len(study.get_trials(deepcopy=False, states=finished_states()))

        while True:
            while pool.free() > 0:
                if orphans:  # its stored parameters come back; any it had not drawn yet are drawn now
                    trial = handle.trial(orphans.pop(0))
                elif finished_count() + len(flights) < tuning.cfg.n_trials:
                    trial = study.ask()
                else:
                    break
                number, trial_id = trial.number, handle.trial_id(trial.number)
                params = {p.key: p.suggest(trial) for p in tuning.params}
                flight = prepare(tuning, handle, number, trial_id, params)
                if flight is None:
                    failed += 1
                    continue
                if tuning.store.has_eval(flight.objective.train_key, flight.objective.key):
                    finish_cached(tuning, handle, flight, tracker)  # identical to a finished run
                    continue
                task = TrialTask(flight.job, flight.objective, tuning.cfg.metric,
                                 rung_steps(tuning.cfg.report_every, flight.job.config.train.steps),
                                 tuning.storage, tuning.study_name, trial_id, tuning.cfg.pruner,
                                 str(tuning.study_dir), str(tuning.store.root), threads)
                name = f"trial {number}"
                flights[name] = flight
                pool.submit([(name, task)])
            if not flights:
                break
            for outcome in pool.wait():
                flight = flights.pop(outcome.name)
                failed += finish(tuning, handle, flight, outcome, tracker)
        mirror_missed(tuning, handle, tracker)
        write_outputs(tuning, study)
        return failed


def prepare(tuning: Tuning, handle: StudyHandle, number: int, trial_id: int, params: dict) -> Flight | None:
    """Plan the trial's run; a point the planner refuses fails the trial with that reason."""
    overrides = trial_overrides(tuning.base, params, tuning.cfg.nfe)
    try:
        plan, job, objective = plan_trial(overrides)
    except UserError as err:
        fail(handle, trial_id, number, str(err))
        return None
    for key, value in (("train_key", job.key), ("eval_key", objective.key), ("overrides", overrides)):
        handle.set_system_attr(trial_id, f"bench:{key}", value)
    prepare_run_folder(tuning.store, job)  # the run folder's config, as benchmark.run writes it
    return Flight(number, trial_id, params, plan, job, objective)


def fail(handle: StudyHandle, trial_id: int, number: int, reason: str) -> None:
    """Record why the trial failed and tell the study so."""
    from optuna.trial import TrialState

    handle.set_user_attr(trial_id, "fail_reason", reason[:500])
    print(f"trial {number}: failed: {reason}", file=sys.stderr, flush=True)
    handle.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


def finish_cached(tuning: Tuning, handle: StudyHandle, flight: Flight, tracker) -> None:
    """A trial whose final evaluation is already on disk: report its cached rungs, tell."""
    store, metric = tuning.store, tuning.cfg.metric
    for step in rung_steps(tuning.cfg.report_every, flight.job.config.train.steps):
        ev = flight.objective.at_step(step)
        if store.has_eval(ev.train_key, ev.key, rung=True):
            handle.report(flight.trial_id, step, metric_value(store.read_eval(ev.train_key, ev.key, rung=True), metric))
    value = metric_value(store.read_eval(flight.objective.train_key, flight.objective.key), metric)
    handle.study.tell(flight.number, value, skip_if_finished=True)
    print(f"trial {flight.number}: {metric}={value:.4f} (cached run {flight.job.key}) {format_params(flight.params)}",
          flush=True)
    mirror_trial(tuning, handle, flight, tracker)


def finish(tuning: Tuning, handle: StudyHandle, flight: Flight, outcome, tracker) -> int:
    """Tell the study how a launched trial ended (complete, pruned or failed), mirror it;
    returns 1 when it failed."""
    from optuna.trial import TrialState

    metric, study = tuning.cfg.metric, handle.study
    failed = 0
    if not outcome.ok:
        fail(handle, flight.trial_id, flight.number, outcome.error)
        failed = 1
    elif outcome.result["state"] == "pruned":
        study.tell(flight.number, state=TrialState.PRUNED, skip_if_finished=True)
        print(f"trial {flight.number}: pruned at step {outcome.result['step']} ({metric}="
              f"{outcome.result['value']:.4f}) {format_params(flight.params)}", flush=True)
    elif not math.isfinite(outcome.result["value"]):
        fail(handle, flight.trial_id, flight.number, f"{metric} is {outcome.result['value']} at nfe={tuning.cfg.nfe}")
        failed = 1
    else:
        value = outcome.result["value"]
        study.tell(flight.number, value, skip_if_finished=True)
        print(f"trial {flight.number}: {metric}={value:.4f} {format_params(flight.params)}", flush=True)
    mirror_trial(tuning, handle, flight, tracker)
    return failed


def format_params(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
