"""A resolved ``benchmark.tune`` command (:class:`Tuning`: base config, space, objective,
study name and storage) and its Optuna study, opened with the storage it lives in
(:class:`StudyHandle`), and :class:`Flight`, a trial in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.catalog import dataset_info
from benchmark.config import expand_overrides, group_choices, merge_overrides, override_key
from benchmark.keys import short_hash
from benchmark.metrics.registry import metric_direction, suite_metrics
from benchmark.plan import EvalJob, Plan, TrainingJob
from benchmark.schema import RunConfig, UserError
from benchmark.store import Store
from benchmark.tuning.space import (
    Param,
    TuneConfig,
    build_pruner,
    build_sampler,
    load_tune_config,
    open_storage,
    parse_param,
    space_path,
)
from benchmark.tuning.trial import format_value, plan_trial


@dataclass
class Tuning:
    """A resolved tuning command: base config, space, objective, study and storage."""

    space_name: str
    cfg: TuneConfig
    params: list[Param]
    base: list[str]
    base_config: RunConfig
    direction: str
    study_name: str
    storage: str
    fingerprint: str

    @property
    def store(self) -> Store:
        return Store(self.base_config.results_dir)

    @property
    def study_dir(self) -> Path:
        return self.store.root / "tune" / self.study_name

    def meta(self) -> dict:
        """What ``tune/<study>/study.json`` records: enough to find the study again."""
        return {"study": self.study_name, "storage": self.storage, "space_name": self.space_name,
                "direction": self.direction, "metric": self.cfg.metric, "nfe": self.cfg.nfe,
                "base_overrides": self.base, "space": self.cfg.space}


def resolve(argv: list[str]) -> Tuning:
    """``tune=<space> [tune.field=value ...] [key=value ...]`` checked before anything runs:
    the space, the base run at both ends of every range, the objective, sampler and pruner."""
    tune_args = [a for a in argv if override_key(a) == "tune" or override_key(a).startswith("tune.")]
    names = [a.split("=", 1)[1] for a in tune_args if override_key(a) == "tune"]
    if len(names) != 1 or not names[0]:
        raise UserError(f"expected exactly one tune=<space>, one of: {', '.join(group_choices('tune'))} "
                        f"(configs/tune/)")
    cfg = load_tune_config(names[0], [a for a in tune_args if override_key(a) != "tune"])
    base = merge_overrides(cfg.base, [a for a in argv if a not in tune_args])
    if len(expand_overrides(base)) != 1:
        raise UserError("the base configuration holds a sweep (a comma list); a study varies only its search "
                        "space: expected one value per key")
    where = str(space_path(names[0]))
    params = [parse_param(k, v, where) for k, v in cfg.space.items()]
    set_keys = {override_key(o) for o in base}
    for p in params:
        if p.key in set_keys:
            raise UserError(f"{p.key} is both tuned ({where}) and set on the command line; expected one of the two")
    if "nfe" in set_keys:
        raise UserError("nfe is set by the objective: expected tune.nfe=N (the NFE the metric is measured at)")
    base_plan, base_job, base_eval = plan_trial([*base, f"nfe={cfg.nfe}"])
    # a data.options value its loader refuses: one line before any study (launch imports submitit: here only)
    from benchmark.launch import check_embedded_data

    check_embedded_data([base_job])
    data = dataset_info(base_job.config.data.name)
    if cfg.metric not in suite_metrics(data.metric):
        raise UserError(f"tune.metric={cfg.metric} is not recorded for data={base_job.config.data.name}; "
                        f"expected one of: {', '.join(suite_metrics(data.metric))}")
    for p in params:  # every key must compose and plan at the ends of its range (or each choice)
        for value in p.probes():
            try:
                plan_trial([*base, f"{p.key}={format_value(value)}", f"nfe={cfg.nfe}"])
            except UserError as err:
                raise UserError(f"search space key {p.key} ({where}) at {format_value(value)}: {err}") from None
    for entry in cfg.enqueue:
        unknown = sorted(set(entry) - {p.key for p in params})
        if unknown:
            raise UserError(f"tune.enqueue names {unknown[0]}, which is not in the search space; expected "
                            f"keys of: {', '.join(p.key for p in params)}")
    build_sampler(cfg.sampler)
    build_pruner(cfg.pruner)
    if cfg.report_every >= base_job.config.train.steps:
        raise UserError(f"tune.report_every={cfg.report_every} >= train.steps={base_job.config.train.steps}: no "
                        f"intermediate checkpoint to report; expected a smaller value or 0 (no pruning)")
    identity = {"base_training": base_job.identity,
                "base_eval": {k: v for k, v in base_eval.identity.items() if k != "train_key"},
                "space": cfg.space, "metric": cfg.metric, "nfe": cfg.nfe}
    fingerprint = short_hash(identity)
    study_name = cfg.study or f"{Path(names[0]).stem}-{fingerprint[:8]}"
    results = Path(base_job.config.results_dir).resolve()
    storage = cfg.storage or f"sqlite:///{results / 'optuna.db'}"
    return Tuning(names[0], cfg, params, base, base_job.config, metric_direction(cfg.metric), study_name,
                  storage, fingerprint)


@dataclass
class StudyHandle:
    """An Optuna study and the storage it was opened on.  The study's API reaches a trial by
    its number; attributes, intermediate values and a trial re-opened in another process
    need its id, which the storage's own (public) methods map and accept."""

    study: Any      # optuna.Study
    storage: Any    # optuna.storages.BaseStorage

    def trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def trial(self, number: int):
        """The live trial ``number`` (an orphan of a stopped driver): suggesting a parameter
        it drew before returns that value, one it had not drawn is drawn now."""
        import optuna

        return optuna.trial.Trial(self.study, self.trial_id(number))

    def frozen(self, trial_id: int):
        return self.storage.get_trial(trial_id)

    def set_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(trial_id, key, value)

    def set_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.storage.set_trial_system_attr(trial_id, key, value)

    def report(self, trial_id: int, step: int, value: float) -> None:
        self.storage.set_trial_intermediate_value(trial_id, step, value)


def open_study(tuning: Tuning) -> StudyHandle:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tuning.store.root.mkdir(parents=True, exist_ok=True)
    storage = open_storage(tuning.storage)
    study = optuna.create_study(study_name=tuning.study_name, storage=storage, direction=tuning.direction,
                                sampler=build_sampler(tuning.cfg.sampler), pruner=build_pruner(tuning.cfg.pruner),
                                load_if_exists=True)
    found = study.user_attrs.get("fingerprint")
    if found is None:
        study.set_user_attr("fingerprint", tuning.fingerprint)
        study.set_user_attr("space", tuning.space_name)
        study.set_user_attr("base_overrides", tuning.base)
        study.set_user_attr("objective", f"{tuning.cfg.metric} at nfe={tuning.cfg.nfe}")
    elif found != tuning.fingerprint:
        raise UserError(f"study {tuning.study_name} in {tuning.storage} was made with another base config, space "
                        f"or objective ({study.user_attrs.get('objective')}, overrides "
                        f"{study.user_attrs.get('base_overrides')}); expected the same command, or a new "
                        f"tune.study=NAME")
    if not study.user_attrs.get("enqueued"):
        # once per study, as listed (a repeat is a repeat); a driver killed half-way through
        # this loop re-enqueues only what is not there yet
        partial = bool(study.get_trials(deepcopy=False))
        for params in tuning.cfg.enqueue:
            study.enqueue_trial(params, skip_if_exists=partial)
        study.set_user_attr("enqueued", True)
    return StudyHandle(study, storage)


@dataclass
class Flight:
    """A trial in flight: its Optuna number and id, parameters and benchmark plan."""

    number: int
    trial_id: int
    params: dict
    plan: Plan
    job: TrainingJob
    objective: EvalJob
