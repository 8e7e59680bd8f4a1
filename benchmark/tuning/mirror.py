"""A study in MLflow: each finished trial's benchmark run (as ``benchmark.run`` logs it)
and the trial itself, a child of the study's parent run; the trials a stopped driver
finished without logging, and (``benchmark.sync``) those of a study run without tracking.
"""

from __future__ import annotations

from benchmark.mirror import mirror
from benchmark.schema import UserError
from benchmark.store import Store
from benchmark.tracking import StudyTracker
from benchmark.tuning.space import open_storage
from benchmark.tuning.study import Flight, StudyHandle, Tuning
from benchmark.tuning.trial import plan_trial

FINISHED = ("COMPLETE", "PRUNED", "FAIL")
"""Trial states (``optuna.trial.TrialState`` names) that are mirrored."""


def finished_states() -> tuple:
    from optuna.trial import TrialState

    return tuple(TrialState[name] for name in FINISHED)


def study_tracker(tuning: Tuning) -> StudyTracker:
    return StudyTracker(tuning.base_config.tracking, tuning.store, tuning.study_name, tuning.study_dir)


def study_tags(meta: dict) -> dict:
    """Tags of a study's parent run in MLflow, from its ``study.json``."""
    return {"space": meta["space_name"], "direction": meta["direction"], "storage": meta["storage"],
            "base_overrides": " ".join(meta["base_overrides"])}


def mirror_trial(tuning: Tuning, handle: StudyHandle, flight: Flight, tracker: StudyTracker) -> None:
    """The trial's run (training and final evaluation, as benchmark.run logs them) and the
    trial itself, a child of the study's parent run."""
    if not tuning.base_config.tracking.enabled:
        return
    mirror(flight.plan, tuning.store, sweep=f"study {tuning.study_name} trial {flight.number}")
    tracker.log_trial(handle.frozen(flight.trial_id), tuning.cfg.metric, tuning.cfg.nfe, study_tags(tuning.meta()))


def mirror_missed(tuning: Tuning, handle: StudyHandle, tracker: StudyTracker) -> None:
    """Finished trials not yet in MLflow (a driver killed between telling and logging)."""
    if not tuning.base_config.tracking.enabled:
        return
    for t in handle.study.get_trials(deepcopy=False, states=finished_states()):
        overrides = t.system_attrs.get("bench:overrides")
        if tracker.down:
            return  # warned once already; benchmark.sync mirrors the rest later
        if tracker.has_trial(t.number) or not overrides:
            continue
        plan, job, objective = plan_trial(list(overrides))
        flight = Flight(t.number, handle.trial_id(t.number), dict(t.params), plan, job, objective)
        mirror_trial(tuning, handle, flight, tracker)


def mirror_finished_trials(meta: dict, store: Store, cfg) -> tuple[int, str]:
    """Log the finished trials of the study ``meta`` (its ``study.json``) not yet in ``cfg``'s
    tracking store (``benchmark.sync``); the count logged and, if MLflow failed, why."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=meta["study"], storage=open_storage(meta["storage"]))
    except KeyError:
        raise UserError(f"study {meta['study']} is not in {meta['storage']} (named by "
                        f"{store.root / 'tune' / meta['study'] / 'study.json'}); expected the storage "
                        f"the study was run with") from None
    tracker = StudyTracker(cfg, store, meta["study"], store.root / "tune" / meta["study"], quiet=True)
    for t in study.get_trials(deepcopy=False, states=finished_states()):
        if tracker.log_trial(t, meta["metric"], meta["nfe"], study_tags(meta)) is None:
            break
    return tracker.logged["trial"], tracker.problem
