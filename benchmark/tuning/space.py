"""The search space and the study's settings: ``configs/tune/<space>.yaml`` read and checked
(:class:`Param` per tuned key, :class:`TuneConfig` for the rest), and the Optuna objects they
name (sampler, pruner, storage), each built from a registry with its arguments checked first.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import CONFIG_DIR, group_choices
from benchmark.schema import UserError, coerce_dataclass

TUNE_DIR = CONFIG_DIR / "tune"


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
