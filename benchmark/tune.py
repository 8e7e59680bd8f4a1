"""Tune hyperparameters with Optuna: ``python -m benchmark.tune tune=<space> key=value ...``.

The search space lives in ``configs/tune/<space>.yaml``: a distribution (float, int, with
optional log scale or step, or categorical) over any key of the resolved config, method
fields included, plus the objective (a recorded metric at one NFE; its direction follows
the metric), the trial budget, the sampler and the pruner.  The other ``key=value``
arguments are the base configuration every trial starts from (Hydra's grammar, no
sweeps); ``tune.<field>=value`` overrides a field of the space file.

Every trial is an ordinary benchmark run: its overrides go through the same composer,
planner, cache and launcher as ``benchmark.run``, so an identical trial is not retrained
(a finished one is not even launched) and the tuned configuration's checkpoint is reused
when it is benchmarked afterwards.  Trials run in parallel through the launcher
(``launcher=local`` processes or SLURM jobs, ``launcher.max_parallel`` at once) with the
Optuna study as shared state: the driver asks the sampler for parameters and tells
results; a trial job trains in segments of ``report_every`` steps, evaluates the
objective at each intermediate checkpoint (cached under ``runs/<key>/rungs/``) and
reports it to the study, whose pruner may stop it there.

Storage is a sqlite file under ``results_dir`` unless ``tune.storage`` names another
(an RDB URL, or ``journal:///path/file.log`` for a shared filesystem without a database).
Rerunning the same command continues the same study: trials a killed driver left running
are run again under their own numbers (their runs resume from checkpoints), so no trial is
lost or counted twice; a trial that fails is recorded as failed with its reason and the
study goes on.  Each finished trial is mirrored to MLflow as a child of the study's
parent run.  At the end ``results_dir/tune/<study>/`` holds the trials (CSV), a table of
the best (Markdown), Optuna's history, intermediate-value and importance plots, and
``best.yaml``, which ``python -m benchmark.run --config <file>`` accepts.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.catalog import METRIC_DIRECTIONS, SUITE_METRICS, dataset_info
from benchmark.config import (
    CONFIG_DIR,
    compose_points,
    expand_overrides,
    group_choices,
    merge_overrides,
    override_key,
)
from benchmark.keys import short_hash
from benchmark.plan import EvalJob, Plan, TrainingJob, plan_points
from benchmark.schema import RunConfig, UserError, coerce_dataclass
from benchmark.store import Store, atomic_write_bytes, atomic_write_json

USAGE = "usage: python -m benchmark.tune tune=<space> [tune.field=value ...] [key=value ...] [--dry-run] [--help]"
TUNE_DIR = CONFIG_DIR / "tune"


# ----------------------------------------------------------------------------------------
# The search space and the study's settings


@dataclass(frozen=True)
class Param:
    """One tuned key: ``float``/``int`` over [low, high] (``log`` scale or a ``step``), or
    ``categorical`` over ``choices``."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def probes(self) -> list:
        """Values that must all compose and plan: the ends of the range, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


PARAM_FIELDS = {"type", "low", "high", "log", "step", "choices"}
DISTRIBUTIONS = ("float", "int", "categorical")


def parse_param(key: str, spec: Any, where: str) -> Param:
    """One entry of ``space``; every mistake is one line naming the key and the fix."""
    at = f"{where}: search space key {key}"
    if not isinstance(spec, dict):
        raise UserError(f"{at} is {spec!r}; expected a mapping like {{type: float, low: 0.0, high: 1.0}}")
    unknown = sorted(set(spec) - PARAM_FIELDS)
    if unknown:
        raise UserError(f"{at} has unknown field '{unknown[0]}'; expected: {', '.join(sorted(PARAM_FIELDS))}")
    kind = spec.get("type")
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{at} has unknown distribution type={kind!r}; expected one of: {', '.join(DISTRIBUTIONS)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or set(spec) - {"type", "choices"}:
            raise UserError(f"{at}: a categorical takes only a non-empty list, choices: [a, b, ...]")
        if any(isinstance(c, (dict, list)) for c in choices):
            raise UserError(f"{at}: choices must be numbers, strings, booleans or null; got {choices!r}")
        return Param(key, kind, choices=tuple(choices))
    if "choices" in spec:
        raise UserError(f"{at}: choices belongs to type: categorical; a {kind} takes low and high")
    number = int if kind == "int" else (int, float)
    for bound in ("low", "high"):
        value = spec.get(bound)
        if not isinstance(value, number) or isinstance(value, bool):
            raise UserError(f"{at}: {bound}={value!r}; expected {'an integer' if kind == 'int' else 'a number'}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if low > high:
        raise UserError(f"{at}: low={low} > high={high}; expected low <= high")
    if not isinstance(log, bool):
        raise UserError(f"{at}: log={log!r}; expected true or false")
    if log and low <= 0:
        raise UserError(f"{at}: log=true needs low > 0; got low={low}")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or step <= 0 or log):
        raise UserError(f"{at}: step={step!r}; expected a positive {'integer' if kind == 'int' else 'number'}"
                        f" and log=false")
    return Param(key, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high,
                 log, step)


SAMPLERS = ("tpe", "random", "qmc", "gp")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "none")


TUNE_HELP = {
    "space": "the tuned keys: {key: {type: float|int|categorical, low, high, log, step, choices}}",
    "base": "overrides every trial starts from (the budget); command-line key=value wins per key",
    "metric": "objective: a metric the dataset's suite records (direction follows it)",
    "nfe": "objective: sampling steps the metric is measured at",
    "n_trials": "trials in the study (finished ones count; a rerun tops the study up to this)",
    "report_every": "training steps between intermediate evaluations reported to the pruner (0 = none)",
    "sampler": "{name: tpe|random|qmc|gp, ...the Optuna sampler's keyword arguments}",
    "pruner": "{name: median|percentile|successive_halving|hyperband|threshold|none, ...its kwargs}",
    "enqueue": "parameter sets tried first, e.g. the paper's defaults",
    "study": "study name ('' = <space>-<hash of the base config, space and objective>)",
    "storage": "Optuna storage ('' = sqlite under results_dir; an RDB URL; journal:///path/file.log)",
    "top": "rows in the best-trials table",
}


def _tune_meta(name: str) -> dict:
    minimum = {"nfe": 1, "n_trials": 1, "report_every": 0, "top": 1}.get(name)
    return {"help": TUNE_HELP[name], "min": minimum}


@dataclass(frozen=True)
class _TuneFields:
    metric: str = field(default="fd", metadata=_tune_meta("metric"))
    nfe: int = field(default=1, metadata=_tune_meta("nfe"))
    n_trials: int = field(default=8, metadata=_tune_meta("n_trials"))
    report_every: int = field(default=0, metadata=_tune_meta("report_every"))
    study: str = field(default="", metadata=_tune_meta("study"))
    storage: str = field(default="", metadata=_tune_meta("storage"))
    top: int = field(default=5, metadata=_tune_meta("top"))


@dataclass(frozen=True)
class TuneConfig(_TuneFields):
    """A search space file (``configs/tune/<space>.yaml``) with its overrides applied."""

    space: dict = field(default_factory=dict)
    base: list = field(default_factory=list)
    sampler: dict = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    enqueue: list = field(default_factory=list)


def space_path(name: str) -> Path:
    """``configs/tune/<name>.yaml``, or ``name`` itself when it is a path ending in .yaml."""
    return Path(name).expanduser() if name.endswith((".yaml", ".yml")) else TUNE_DIR / f"{name}.yaml"


def load_tune_config(space_name: str, overrides: list[str]) -> TuneConfig:
    """``configs/tune/<space_name>.yaml`` with ``tune.<field>=value`` overrides applied."""
    import yaml

    path = space_path(space_name)
    if not path.is_file():
        raise UserError(f"unknown tune '{space_name}'; expected one of: {', '.join(group_choices('tune'))} "
                        f"(configs/tune/), or the path of a space file ending in .yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); expected a mapping") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds {type(raw).__name__}; expected a mapping of tune fields")
    for key, value in _parse_values(overrides):
        parts, target = key.split(".")[1:], raw
        if not parts:
            raise UserError(f"{key}={value!r}: expected tune=<space> or tune.<field>=value")
        if parts[0] == "space":
            raise UserError(f"{key}: the search space is edited in {path} (its keys "
                            f"hold dots); expected tune.<field>=value for the other fields")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UserError(f"{key}: {part} is not a mapping in {path}")
        target[parts[-1]] = value
    fields = {f.name: f for f in dataclasses.fields(TuneConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"unknown key 'tune.{unknown[0]}' ({path}); expected one of: "
                        f"{', '.join('tune.' + k for k in fields)}")
    cfg = coerce_dataclass(_TuneFields, {k: v for k, v in raw.items() if k in _TUNE_SCALARS}, "tune")
    for name in ("sampler", "pruner"):
        if name in raw and not (isinstance(raw[name], dict) and isinstance(raw[name].get("name"), str)):
            raise UserError(f"tune.{name}={raw[name]!r}; expected a mapping with a name, e.g. {{name: median}}")
    if not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise UserError(f"{path} has no search space; expected space: {{key: "
                        f"{{type: float, low: .., high: ..}}, ...}}")
    if not isinstance(raw.get("base", []), list) or not all(isinstance(b, str) for b in raw.get("base", [])):
        raise UserError("tune.base must be a list of key=value overrides (the budget every trial starts from)")
    if not isinstance(raw.get("enqueue", []), list) or not all(isinstance(e, dict) for e in raw.get("enqueue", [])):
        raise UserError("tune.enqueue must be a list of {key: value} mappings (parameter sets tried first)")
    return TuneConfig(space=raw["space"], base=raw.get("base", []), sampler=raw.get("sampler", TuneConfig().sampler),
                      pruner=raw.get("pruner", TuneConfig().pruner), enqueue=raw.get("enqueue", []),
                      **dataclasses.asdict(cfg))


_TUNE_SCALARS = {f.name for f in dataclasses.fields(_TuneFields)}


def _parse_values(overrides: list[str]) -> list[tuple[str, Any]]:
    """``tune.a.b=value`` -> (key, typed value) with Hydra's grammar (no sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise UserError(f"{str(err).splitlines()[0]}; expected tune.<field>=value") from None
    out = []
    for override in parsed:
        if override.is_sweep_override():
            raise UserError(f"{override.input_line} is a sweep; a study tunes by its sampler: expected one value")
        out.append((override.get_key_element().lstrip("+"), override.value()))
    return out


def build_sampler(spec: dict):
    import optuna

    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "qmc": optuna.samplers.QMCSampler, "gp": optuna.samplers.GPSampler}
    return _construct("sampler", spec, classes)


def build_pruner(spec: dict):
    import optuna

    classes = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner,
               "none": optuna.pruners.NopPruner}
    return _construct("pruner", spec, classes)


def _construct(kind: str, spec: dict, classes: dict):
    """An Optuna sampler or pruner from the registry, its keyword arguments checked first."""
    import inspect

    name = spec.get("name")
    if name not in classes:
        raise UserError(f"tune.{kind}.name={name!r} is not a known {kind}; expected one of: {', '.join(classes)}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    accepted = set(inspect.signature(classes[name]).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise UserError(f"tune.{kind}.{unknown[0]} is not an option of the {name} {kind}; expected one of: "
                        f"{', '.join(sorted(accepted)) or '(none)'}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning of some samplers
            return classes[name](**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"tune.{kind}={spec}: {err}") from None


# ----------------------------------------------------------------------------------------
# Trials as benchmark runs


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
def _flock(path: Path, blocking: bool = True) -> Iterator[bool]:
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
        from benchmark.launch import _set_threads

        _set_threads(self.threads)
        # a second job of the same trial (a killed driver's orphan still running) waits
        with _flock(Path(self.study_dir) / "locks" / f"trial-{self.trial_id}.lock"):
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
            trial = trial or _open_trial(self.storage, self.study_name, self.trial_id, self.pruner)
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


def open_storage(url: str):
    """An Optuna storage from a URL: RDB (sqlite waits for its lock instead of failing at
    once when several trial jobs report together) or ``journal:///path/file.log``."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as err:  # sqlalchemy: unknown dialect, driver missing, unreachable server
        raise UserError(f"tune.storage={url!r} cannot be opened ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); expected sqlite:///file.db, an RDB URL "
                        f"or journal:///path/file.log") from None


def _open_trial(storage: str, study_name: str, trial_id: int, pruner: dict):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage), pruner=build_pruner(pruner))
    return optuna.trial.Trial(study, trial_id)


# ----------------------------------------------------------------------------------------
# The driver


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
    data = dataset_info(base_job.config.data.name)
    if cfg.metric not in SUITE_METRICS[data.metric]:
        raise UserError(f"tune.metric={cfg.metric} is not recorded for data={base_job.config.data.name}; "
                        f"expected one of: {', '.join(SUITE_METRICS[data.metric])}")
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
    return Tuning(names[0], cfg, params, base, base_job.config, METRIC_DIRECTIONS[cfg.metric], study_name,
                  storage, fingerprint)


def open_study(tuning: Tuning):
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
    return study


@dataclass
class Flight:
    """A trial in flight: its Optuna number and id, parameters and benchmark plan."""

    number: int
    trial_id: int
    params: dict
    plan: Plan
    job: TrainingJob
    objective: EvalJob


def drive(tuning: Tuning) -> int:
    """Run the study to ``n_trials`` finished trials; returns the failed-trial count of this call."""
    import optuna
    from optuna.trial import TrialState

    from benchmark.launch import Pool, job_threads

    study = open_study(tuning)
    atomic_write_json(tuning.study_dir / "study.json", tuning.meta())  # benchmark.sync finds it here
    with _flock(tuning.study_dir / "driver.lock", blocking=False) as mine:
        if not mine:
            holder = (tuning.study_dir / "driver.lock").read_text().strip()
            raise UserError(f"study {tuning.study_name} is being driven by another benchmark.tune ({holder}); "
                            f"expected one driver per study: wait for it, or give this one tune.study=OTHER")
        tracker = _study_tracker(tuning)
        launcher = tuning.base_config.launcher
        pool = Pool(launcher, Path(launcher.folder) if launcher.folder else tuning.store.root / "submitit")
        threads = job_threads(launcher)
        # trials a killed driver left RUNNING: run them again under their own numbers
        orphans = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        if orphans:
            print(f"resuming trial(s) {', '.join(str(t.number) for t in orphans)} left running by a stopped driver")
        flights: dict[str, Flight] = {}
        failed = 0
        print(f"study {tuning.study_name}: {tuning.cfg.metric} at nfe={tuning.cfg.nfe} ({tuning.direction}), "
              f"{tuning.cfg.n_trials} trials, storage {tuning.storage}", flush=True)

        def finished_count() -> int:
            done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
            return len(study.get_trials(deepcopy=False, states=done))

        while True:
            while pool.free() > 0:
                if orphans:  # its stored parameters come back; any it had not drawn yet are drawn now
                    trial = optuna.trial.Trial(study, orphans.pop(0)._trial_id)
                elif finished_count() + len(flights) < tuning.cfg.n_trials:
                    trial = study.ask()
                else:
                    break
                number, trial_id = trial.number, trial._trial_id
                params = {p.key: p.suggest(trial) for p in tuning.params}
                flight = _prepare(tuning, study, number, trial_id, params)
                if flight is None:
                    failed += 1
                    continue
                if tuning.store.has_eval(flight.objective.train_key, flight.objective.key):
                    _finish_cached(tuning, study, flight, tracker)  # identical to a finished run
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
                failed += _finish(tuning, study, flight, outcome, tracker)
        _mirror_missed(tuning, study, tracker)
        write_outputs(tuning, study)
        return failed


def _prepare(tuning: Tuning, study, number: int, trial_id: int, params: dict) -> Flight | None:
    """Plan the trial's run; a point the planner refuses fails the trial with that reason."""
    from optuna.trial import TrialState

    overrides = trial_overrides(tuning.base, params, tuning.cfg.nfe)
    try:
        plan, job, objective = plan_trial(overrides)
    except UserError as err:
        _fail(study, trial_id, number, str(err))
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        return None
    for key, value in (("train_key", job.key), ("eval_key", objective.key), ("overrides", overrides)):
        study._storage.set_trial_system_attr(trial_id, f"bench:{key}", value)
    from benchmark.run import prepare_run_folder

    prepare_run_folder(tuning.store, job)  # the run folder's config, as benchmark.run writes it
    return Flight(number, trial_id, params, plan, job, objective)


def _fail(study, trial_id: int, number: int, reason: str) -> None:
    study._storage.set_trial_user_attr(trial_id, "fail_reason", reason[:500])
    print(f"trial {number}: failed: {reason}", file=sys.stderr, flush=True)


def _finish_cached(tuning: Tuning, study, flight: Flight, tracker) -> None:
    """A trial whose final evaluation is already on disk: report its cached rungs, tell."""
    store, metric = tuning.store, tuning.cfg.metric
    for step in rung_steps(tuning.cfg.report_every, flight.job.config.train.steps):
        ev = flight.objective.at_step(step)
        if store.has_eval(ev.train_key, ev.key, rung=True):
            value = metric_value(store.read_eval(ev.train_key, ev.key, rung=True), metric)
            study._storage.set_trial_intermediate_value(flight.trial_id, step, value)
    value = metric_value(store.read_eval(flight.objective.train_key, flight.objective.key), metric)
    study.tell(flight.number, value, skip_if_finished=True)
    print(f"trial {flight.number}: {metric}={value:.4f} (cached run {flight.job.key}) {_fmt_params(flight.params)}",
          flush=True)
    _mirror(tuning, study, flight, tracker)


def _finish(tuning: Tuning, study, flight: Flight, outcome, tracker) -> int:
    from optuna.trial import TrialState

    metric = tuning.cfg.metric
    failed = 0
    if not outcome.ok:
        _fail(study, flight.trial_id, flight.number, outcome.error)
        study.tell(flight.number, state=TrialState.FAIL, skip_if_finished=True)
        failed = 1
    elif outcome.result["state"] == "pruned":
        study.tell(flight.number, state=TrialState.PRUNED, skip_if_finished=True)
        print(f"trial {flight.number}: pruned at step {outcome.result['step']} ({metric}="
              f"{outcome.result['value']:.4f}) {_fmt_params(flight.params)}", flush=True)
    elif not math.isfinite(outcome.result["value"]):
        _fail(study, flight.trial_id, flight.number, f"{metric} is {outcome.result['value']} at nfe={tuning.cfg.nfe}")
        study.tell(flight.number, state=TrialState.FAIL, skip_if_finished=True)
        failed = 1
    else:
        value = outcome.result["value"]
        study.tell(flight.number, value, skip_if_finished=True)
        print(f"trial {flight.number}: {metric}={value:.4f} {_fmt_params(flight.params)}", flush=True)
    _mirror(tuning, study, flight, tracker)
    return failed


def _fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _study_tracker(tuning: Tuning):
    from benchmark.tracking import StudyTracker

    return StudyTracker(tuning.base_config.tracking, tuning.store, tuning.study_name, tuning.study_dir)


def _mirror(tuning: Tuning, study, flight: Flight, tracker) -> None:
    """The trial's run (training and final evaluation, as benchmark.run logs them) and the
    trial itself, a child of the study's parent run."""
    from benchmark.run import mirror

    if not tuning.base_config.tracking.enabled:
        return
    mirror(flight.plan, tuning.store, sweep=f"study {tuning.study_name} trial {flight.number}")
    frozen = study._storage.get_trial(flight.trial_id)
    tracker.log_trial(frozen, tuning.cfg.metric, tuning.cfg.nfe, study_tags(tuning.meta()))


def study_tags(meta: dict) -> dict:
    """Tags of a study's parent run in MLflow, from its ``study.json``."""
    return {"space": meta["space_name"], "direction": meta["direction"], "storage": meta["storage"],
            "base_overrides": " ".join(meta["base_overrides"])}


def mirror_finished_trials(meta: dict, store: Store, cfg) -> tuple[int, str]:
    """Log the finished trials of the study ``meta`` (its ``study.json``) not yet in ``cfg``'s
    tracking store (``benchmark.sync``); the count logged and, if MLflow failed, why."""
    import optuna
    from optuna.trial import TrialState

    from benchmark.tracking import StudyTracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=meta["study"], storage=open_storage(meta["storage"]))
    except KeyError:
        raise UserError(f"study {meta['study']} is not in {meta['storage']} (named by "
                        f"{store.root / 'tune' / meta['study'] / 'study.json'}); expected the storage "
                        f"the study was run with") from None
    tracker = StudyTracker(cfg, store, meta["study"], store.root / "tune" / meta["study"], quiet=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if tracker.log_trial(t, meta["metric"], meta["nfe"], study_tags(meta)) is None:
            break
    return tracker.logged["trial"], tracker.problem


def _mirror_missed(tuning: Tuning, study, tracker) -> None:
    """Finished trials not yet in MLflow (a driver killed between telling and logging)."""
    from optuna.trial import TrialState

    if not tuning.base_config.tracking.enabled:
        return
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=done):
        overrides = t.system_attrs.get("bench:overrides")
        if tracker.down:
            return  # warned once already; benchmark.sync mirrors the rest later
        if tracker.has_trial(t.number) or not overrides:
            continue
        plan, job, objective = plan_trial(list(overrides))
        _mirror(tuning, study, Flight(t.number, t._trial_id, dict(t.params), plan, job, objective), tracker)


# ----------------------------------------------------------------------------------------
# Outputs


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     "last_step": t.last_step, **t.params,
                     "train_key": t.system_attrs.get("bench:train_key", ""),
                     "seconds": duration, "reason": t.user_attrs.get("fail_reason", "")})
    return rows


def best_table(tuning: Tuning, study) -> str:
    """Markdown: the best ``top`` complete trials, best first."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    done.sort(key=lambda t: t.value, reverse=tuning.direction == "maximize")
    keys = [p.key for p in tuning.params]
    header = ["trial", f"{tuning.cfg.metric} @ {tuning.cfg.nfe} NFE", *keys, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for t in done[:tuning.cfg.top]:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        cells = [str(t.number), f"{t.value:.4f}", *(_cell(t.params.get(k)) for k in keys), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines.append(f"\n{sum(counts.values())} trials: {counts['complete']} complete, {counts['pruned']} pruned, "
                 f"{counts['fail']} failed (study {tuning.study_name})")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def export_best(tuning: Tuning, study) -> Path | None:
    """``best.yaml``: the best trial's overrides (without nfe, so the benchmark can sweep it)."""
    import yaml
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    overrides = [o for o in trial_overrides(tuning.base, best.params, tuning.cfg.nfe) if override_key(o) != "nfe"]
    path = tuning.study_dir / "best.yaml"
    header = (f"# Best trial ({best.number}) of Optuna study {tuning.study_name}: {tuning.cfg.metric} = "
              f"{best.value:.6g} at nfe={tuning.cfg.nfe} ({tuning.direction}).\n"
              f"# Benchmark it: python -m benchmark.run --config {path} nfe=1,2,4\n"
              f"# (command-line overrides win over the ones below)\n")
    body = {"study": tuning.study_name, "trial": best.number, "metric": tuning.cfg.metric, "nfe": tuning.cfg.nfe,
            "value": float(best.value), "params": dict(best.params), "overrides": overrides}
    atomic_write_bytes(path, (header + yaml.safe_dump(body, sort_keys=False)).encode())
    return path


def write_outputs(tuning: Tuning, study) -> None:
    """trials.csv, best.md, best.yaml and Optuna's plots under results_dir/tune/<study>/."""
    folder = tuning.study_dir
    rows = trial_rows(study)
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(folder / "trials.csv", buffer.getvalue().encode())
    table = best_table(tuning, study)
    atomic_write_bytes(folder / "best.md", (table + "\n").encode())
    best = export_best(tuning, study)
    plots = _plots(study, folder)
    print(table)
    if best is not None:
        print(f"best config: {best}\n  benchmark it: python -m benchmark.run --config {best} nfe=1,2,4")
    print(f"trials, table and plots ({', '.join(plots) or 'none yet'}) under {folder}")


def _plots(study, folder: Path) -> list[str]:
    """Optuna's history, intermediate values and parameter importances as PNGs (each
    skipped when the study has too little for it yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials yet" and the like
    made = []
    for name, fn in (("history", ovm.plot_optimization_history), ("intermediate", ovm.plot_intermediate_values),
                     ("importance", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4.5)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            atomic_write_bytes(folder / f"{name}.png", buffer.getvalue())
            made.append(f"{name}.png")
        except Exception:  # noqa: BLE001 - e.g. importances need two complete trials; plots are extras
            plt.close("all")
    return made


# ----------------------------------------------------------------------------------------
# CLI


def help_text() -> str:
    lines = [USAGE, "", "Tune a method with Optuna; every trial is an ordinary benchmark run (cached, launched,",
             "mirrored to MLflow). The other key=value arguments are the base config of every trial.", "",
             f"spaces (configs/tune/): {', '.join(group_choices('tune'))}", "", "tune fields (tune.<field>=value):"]
    lines += [f"  {name:<13} {text}" for name, text in TUNE_HELP.items()]
    lines += ["", "flags:", "  --dry-run  print the study, its search space and the base run, and exit", "",
              "example: python -m benchmark.tune tune=meanflow_digits launcher=local",
              "live view: optuna-dashboard sqlite:///results/optuna.db   (serves on localhost:8080)"]
    return "\n".join(lines)


def print_dry_run(tuning: Tuning) -> None:
    print(f"study {tuning.study_name}  storage {tuning.storage}")
    print(f"objective: {tuning.direction} {tuning.cfg.metric} at nfe={tuning.cfg.nfe}; {tuning.cfg.n_trials} trials, "
          f"{tuning.base_config.launcher.max_parallel if tuning.base_config.launcher.name != 'inline' else 1} "
          f"at once (launcher={tuning.base_config.launcher.name})")
    print(f"sampler {tuning.cfg.sampler}; pruner {tuning.cfg.pruner}; rungs at steps "
          f"{rung_steps(tuning.cfg.report_every, tuning.base_config.train.steps) or 'none (no pruning)'}")
    print("search space:")
    for p in tuning.params:
        what = f"one of {list(p.choices)}" if p.type == "categorical" else \
            f"[{p.low}, {p.high}]" + (" log" if p.log else "") + (f" step {p.step}" if p.step else "")
        print(f"  {p.key}: {p.type} {what}")
    print(f"base: {' '.join(tuning.base) or '(defaults)'}")


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = {a for a in argv if a.startswith("-")}
        unknown = flags - {"--dry-run", "--help", "-h"}
        if unknown:
            raise UserError(f"unknown flag {sorted(unknown)[0]}; expected --dry-run or --help")
        if flags & {"--help", "-h"}:
            print(help_text())
            return 0
        tuning = resolve([a for a in argv if not a.startswith("-")])
        if "--dry-run" in flags:
            print_dry_run(tuning)
            return 0
        start = time.perf_counter()
        failed = drive(tuning)
        print(f"done in {time.perf_counter() - start:.1f} s"
              + (f"; {failed} trial(s) failed (reasons above and in trials.csv)" if failed else ""))
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue the study", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run the module's import, not __main__, so trial tasks pickle by reference for the launchers
    from benchmark.tune import main as _main

    sys.exit(_main())
