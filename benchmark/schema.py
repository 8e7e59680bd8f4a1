"""Typed schemas of the config groups and the one function that checks a composed config.

Hydra composes the YAML groups in ``configs/``; this module turns the composed dict into
frozen dataclasses, rejecting unknown keys, wrong types and out-of-range values with one
line that names the bad value, what was expected and how to fix it.  Torch-free.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


class Failure(RuntimeError):
    """The work ran and failed for a reason its message states (e.g. a diverged training):
    printed as one line, exit code 1."""


# Sizes past these are mistakes, refused while planning rather than failing after training:
MAX_SEED = 2**32 - 1       # seeds also seed numpy, whose seeds are 32-bit
MAX_NFE = 10_000           # sampling steps; published few-step to many-step samplers use <= 1000
MAX_SAMPLES = 1_000_000    # generated samples per point; FID-50k is the usual size


def _spec(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          gt: float | None = None, lt: float | None = None,
          choices: tuple | None = None, semantic: bool = True, nonempty: bool = False,
          parse: Any = None, omit_default: bool = False) -> Any:
    """A config field: help text, bounds (``min``/``max`` inclusive, ``gt``/``lt``
    exclusive) or choices, whether it changes results (``semantic``), whether an empty
    string is refused, an optional ``parse(key, value)`` that checks and normalises a value
    whose type is not a plain one, and whether the key leaves it out at its default
    (``omit_default``: for fields added after results existed).  Method specs declare
    their fields with the same constraint keys (``methods.specs.base.train_field``)."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "choices": choices,
            "semantic": semantic, "nonempty": nonempty, "parse": parse, "omit_default": omit_default}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


config_field = _spec
"""The public name of :func:`_spec`: config dataclasses outside this module (``benchmark.encode``)
declare their fields with it."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = _spec("dit-tiny", "size name from the registry (dit-tiny ... dit-xl, mlp)")
    backbone: str = _spec("dit", "backbone family", choices=("dit", "mlp"))
    conditioning_mode: str = _spec("adaln", "DiT conditioning; a method may ask for another",
                                   choices=("adaln", "in_context"))
    # DiT's own initialisation draws the class-embedding table at std 0.02; with the
    # zero-initialised adaLN modulation that leaves class conditioning at a saddle for the
    # first ~1000 steps of a small run (300-step class accuracy at chance for every method).
    # 1.0 (torch's nn.Embedding default) escapes it at once; README "300 steps".
    label_init_std: float = _spec(1.0, "std of the class-embedding table at initialisation (dit only; DiT's own: 0.02)",
                                  min=0.0)
    width: int = _spec(128, "MLP width (mlp only)", min=1)
    depth: int = _spec(4, "MLP depth (mlp only)", min=1)


@dataclass(frozen=True)
class DataConfig:
    name: str = _spec("digits", "dataset registry name")
    options: dict = _spec({}, "dataset options (e.g. mean/std of gaussian1d)")
    # Datasets read from disk (mnist, cifar10, imagefolder, latents): where their files are.
    # Not semantic: the training key carries a fingerprint of the files instead of the path.
    root: str = _spec("", "folder holding the dataset's files (datasets read from disk)", semantic=False)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _spec(3000, "optimizer steps", min=1)
    batch_size: int = _spec(128, "global batch size", min=1)
    # The global batch is cut into this many equal micro-batches, each seeded by its index; the
    # processes of a data-parallel job share them out, so the count (not the process count)
    # fixes the training path and is part of the key.
    micro_batches: int = _spec(1, "micro-batches per step (gradient accumulation; a multiple of the "
                                  "number of data-parallel processes)", min=1)
    lr: float = _spec(1e-3, "peak AdamW learning rate", min=0.0)
    betas: list = _spec([0.9, 0.999], "AdamW betas", parse=lambda key, v: _parse_betas(key, v))
    weight_decay: float = _spec(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = _spec(100, "linear warmup steps", min=0)
    schedule: str = _spec("cosine", "learning-rate schedule after warmup", choices=("constant", "cosine"))
    grad_clip: float = _spec(1.0, "max global grad norm (0 = off)", min=0.0)
    # Power-function EMA profiles (sigma_rel) tracked while training and snapshotted
    # ema_snapshots times over the run; evaluation reconstructs any sigma_rel (eval.ema).
    ema_profiles: list = _spec([0.05, 0.10], "sigma_rel of the tracked power-function EMA profiles",
                               parse=lambda key, v: _parse_profiles(key, v))
    ema_snapshots: int = _spec(12, "EMA snapshots saved evenly over the run (storage: 2 x this x model size)",
                               min=1, max=10_000)
    # A compute budget the planner turns into ``steps`` per method before training (the
    # resolved steps, not the budget, enter the key): flops:fm3000 = as many training FLOPs
    # as 3000 Flow Matching steps on the same model, data and batch.
    budget: str = _spec("", "training budget: empty = steps; flops:<method><steps> or flops:<total FLOPs> "
                            "(resolved to steps per method by FLOP counting)", semantic=False,
                    parse=lambda key, v: _parse_budget(key, v))
    # Mixed precision: bf16 autocast of the loss (both passes of the JVP methods' forward-mode
    # pass included); parameters, optimizer, tangent output, targets and loss stay float32.
    precision: str = _spec("fp32", "training precision: fp32, or bf16 autocast (GPUs with bf16; "
                                   "runs on the CPU too)", choices=("fp32", "bf16"), omit_default=True)
    # torch.compile of the loss computation; numerics agree with eager to rounding, so it is
    # not part of the key.
    compile: bool = _spec(False, "torch.compile the training loss (compile time is paid once per process; see "
                                 "README)", semantic=False)
    ckpt_every: int = _spec(500, "steps between checkpoints", min=1, semantic=False)
    log_every: int = _spec(50, "steps between curve points", min=1, semantic=False)
    device: str = _spec("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"), semantic=False)
    threads: int = _spec(0, "torch CPU threads (0 = torch default)", min=0, semantic=False)
    progress: bool = _spec(True, "show a progress bar", semantic=False)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, int) and isinstance(self.micro_batches, int) \
                and self.micro_batches >= 1 and self.batch_size % self.micro_batches:
            n = self.micro_batches
            raise UserError(f"train.batch_size={self.batch_size} does not split into train.micro_batches={n} "
                            f"equal micro-batches; expected a multiple of {n}: set train.batch_size="
                            f"{max(n, self.batch_size - self.batch_size % n)} or another train.micro_batches")


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int | None = _spec(None, "generated samples per evaluation point (null = the dataset's "
                                          "default: digits 1000, toys 20000, datasets on disk 1000)",
                                    min=2, max=MAX_SAMPLES)
    batch_size: int = _spec(500, "sampling batch size (samples do not depend on it)", min=1, semantic=False)
    seed: int = _spec(2024, "evaluation seed (each sample's noise is seeded from it and its index)",
                      min=0, max=MAX_SEED)
    ema: object = _spec(0.1, "evaluation weights: raw (the trained weights) or the sigma_rel of a "
                             "post-hoc EMA reconstructed from the run's snapshots (a comma list sweeps)",
                        parse=lambda key, v: parse_ema(key, v))
    grid_per_class: int = _spec(8, "samples per class in the PNG grid", min=1)
    bootstrap: int = _spec(200, "bootstrap resamples of the generated features for each metric's 95% "
                                "interval (no regeneration)", min=20, max=100_000)
    # Options of the "fid" metric suite (datasets read from disk); digits and toys ignore them
    # and keep their own suites (benchmark.catalog), so these stay out of their keys.
    backend: str = _spec("torch-fidelity", "library computing FD/KID (fid suite)",
                         choices=("torch-fidelity", "clean-fid"))
    extractor: str = _spec("inception-v3", "feature network of FD/KID (fid suite)",
                           choices=("inception-v3", "digits", "pixels"))
    inception_weights: str = _spec("", "Inception weights file or folder ('' = the libraries' caches)",
                                   semantic=False)
    reference_split: str = _spec("train", "real split the samples are compared with (fid suite)",
                                 choices=("train", "test"))
    # An ADM-format reference batch replaces the split; its bytes (not its path) enter the key.
    reference: str = _spec("", "ADM reference batch .npz (mu/sigma and/or arr_0) instead of the "
                               "dataset's split ('' = the split; fid suite)", semantic=False)
    num_reference: int = _spec(50000, "real images in the reference; a fixed subset if the split is "
                                      "larger (fid suite)", min=2)
    precision_recall: bool = _spec(False, "also improved precision/recall, k-NN in feature space (fid suite)")
    feature_batch_size: int = _spec(64, "images per feature-network batch", min=1, semantic=False)
    progress: bool = _spec(True, "progress bars: sampling, feature batches, evaluation points (on a terminal)", semantic=False)


SIGMA_REL_RANGE = (0.0, 0.28)
"""Open interval of relative EMA widths (0.2887 is a plain average of the whole run)."""


def _sigma_rel(key: str, value: Any) -> float:
    lo, hi = SIGMA_REL_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise UserError(f"{key}={value!r} is not a relative EMA width; expected a number sigma_rel "
                        f"with {lo:g} < sigma_rel < {hi:g} (e.g. 0.05, 0.1, 0.2)")
    return float(value)


def parse_ema(key: str, value: Any) -> str | float:
    """``raw`` or a sigma_rel: the weights an evaluation samples from."""
    if value == "raw":
        return "raw"
    if isinstance(value, str):
        raise UserError(f"{key}={value!r} is not an EMA choice; expected raw or a relative EMA width "
                        f"sigma_rel such as 0.05, 0.1 or 0.2")
    return _sigma_rel(key, value)


def _parse_betas(key: str, value: Any) -> list[float]:
    bad = _non_finite(value)
    if bad is not None:
        raise UserError(f"{key}={bad!r} is not a finite number; expected two numbers in [0, 1), "
                        f"e.g. {key}=[0.9,0.999]")
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in value))
    if not ok or not all(0 <= b < 1 for b in value):
        raise UserError(f"{key}={value!r} is not a pair of AdamW betas; expected two numbers in [0, 1), "
                        f"e.g. {key}=[0.9,0.999]")
    return [float(b) for b in value]


def _parse_profiles(key: str, value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f"{key}={value!r} is not a list of EMA widths; expected e.g. {key}=[0.05,0.1]")
    profiles = [_sigma_rel(key, v) for v in value]
    if len(set(profiles)) != len(profiles):
        raise UserError(f"{key}={value!r} repeats a width; expected distinct values, e.g. [0.05,0.1]")
    return sorted(profiles)


BUDGET_GRAMMAR = ("train.budget= (empty: train.steps), flops:<method><steps> (as many training FLOPs as "
                  "<steps> steps of <method> on the same model, data and batch, e.g. flops:fm3000) or "
                  "flops:<number> (total training FLOPs, e.g. flops:1.5e15)")
_BUDGET = re.compile(r"^flops:(?:(?P<method>[a-z][a-z0-9_-]*?)(?P<steps>[0-9]+)|(?P<total>[0-9.]+(?:e[+]?[0-9]+)?))$")


def parse_budget(text: str) -> tuple[str | None, float]:
    """``flops:fm3000`` -> ("fm", 3000); ``flops:1.5e15`` -> (None, 1.5e15)."""
    match = _BUDGET.match(text.strip().lower())
    if not match:
        raise UserError(f"train.budget={text!r} is not a budget; expected {BUDGET_GRAMMAR}")
    if match["total"]:
        total = float(match["total"])
        if not math.isfinite(total) or total <= 0:
            raise UserError(f"train.budget={text!r} is not a positive number of FLOPs; expected {BUDGET_GRAMMAR}")
        return None, total
    steps = int(match["steps"])
    if steps < 1:
        raise UserError(f"train.budget={text!r} asks for {steps} steps; expected at least 1")
    return match["method"], float(steps)


def _parse_budget(key: str, value: Any) -> str:
    if value in ("", None):
        return ""
    parse_budget(str(value))
    return str(value).strip().lower()


FID_SUITE_FIELDS = ("backend", "extractor", "reference_split", "num_reference", "precision_recall")
"""EvalConfig fields read only by the fid suite: they enter evaluation keys only for its datasets."""


TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                    "databricks-uc", "uc")
"""URI schemes MLflow's tracking store registry opens (a database scheme may name its driver,
``postgresql+psycopg2``); a plain path is a file store.  A test keeps this list in step
with the installed MLflow."""

_URI_EXAMPLES = ("expected '' (the sqlite store under results_dir), sqlite:///path/mlflow.db, "
                 "http(s)://host:port, file:/path, postgresql://..., mysql://..., mssql:// or databricks")


def parse_tracking_uri(key: str, value: Any) -> str:
    """An MLflow tracking URI whose scheme MLflow can open, checked before anything runs."""
    if not isinstance(value, str):
        raise UserError(f"{key}={value!r} is not a string; {_URI_EXAMPLES}")
    uri = value.strip()
    scheme, sep, rest = uri.partition(":")
    if not sep or "/" in scheme or len(scheme) == 1:  # a path (or a Windows drive): a file store
        return uri
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise UserError(f"{key}={value!r} has the scheme '{scheme}:', which MLflow cannot open; {_URI_EXAMPLES}")
    if scheme == "sqlite" and (not rest.startswith("///") or not rest[3:]):
        raise UserError(f"{key}={value!r} is not a sqlite URI MLflow opens; expected sqlite:///relative/path.db "
                        f"or sqlite:////absolute/path.db")
    if scheme in ("http", "https") and not rest.removeprefix("//").split("/", 1)[0]:
        raise UserError(f"{key}={value!r} names no server; expected {scheme}://host:port")
    return uri


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = _spec(True, "mirror runs to MLflow", semantic=False)
    uri: str = _spec("", "MLflow tracking URI ('' = sqlite store under results_dir)", semantic=False,
                     parse=lambda key, v: parse_tracking_uri(key, v))
    experiment: str = _spec("fewstep-bench", "MLflow experiment name", semantic=False, nonempty=True)


@dataclass(frozen=True)
class LauncherConfig:
    name: str = _spec("inline", "where jobs run", choices=("inline", "local", "slurm"), semantic=False)
    max_parallel: int = _spec(2, "local: jobs running at once; slurm: array parallelism", min=1, semantic=False)
    timeout_min: int = _spec(60, "per-job time limit in minutes (training requeues from its checkpoint)",
                             min=1, semantic=False)
    threads: int = _spec(0, "torch threads per local job (0 = cores / max_parallel)", min=0, semantic=False)
    partition: str = _spec("", "slurm partition ('' = the cluster's default)", semantic=False)
    gpus_per_node: int = _spec(0, "GPUs per job", min=0, semantic=False)
    cpus_per_task: int = _spec(1, "CPUs per job", min=1, semantic=False)
    mem_gb: int = _spec(0, "memory per job in GB (0 = the cluster's default)", min=0, semantic=False)
    max_requeues: int = _spec(3, "slurm: requeues after a time limit or preemption", min=0, semantic=False)
    additional: dict = _spec({}, "extra sbatch options, e.g. {account: x, qos: y}", semantic=False)
    folder: str = _spec("", "submitit logs and pickles ('' = <results_dir>/submitit)", semantic=False)


@dataclass(frozen=True)
class RunConfig:
    """One point of a sweep, fully resolved; ``method`` stays a dict until the method's
    own config class checks it."""

    method: dict
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    tracking: TrackingConfig
    launcher: LauncherConfig
    seed: int = 0
    nfe: int = 1
    guidance: float = 1.0
    results_dir: str = "results"


GROUP_CLASSES = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
    "tracking": TrackingConfig, "launcher": LauncherConfig,
}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "a mapping"}.get(tp, str(tp))


def coerce_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Check and convert one value; ``key`` is the dotted name shown in errors."""
    if meta.get("parse"):
        return meta["parse"](key, value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else coerce_value(key, value, inner[0], meta)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, (list, tuple)),
        dict: isinstance(value, dict),
    }.get(tp, True)
    if tp is int and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise UserError(f"{key}={value!r} is not {_type_name(tp)}; expected {_type_name(tp)}"
                        + _fix_hint(key, meta))
    value = float(value) if tp is float else value
    value = list(value) if tp is list else value
    bad = _non_finite(value)
    if bad is not None:
        raise UserError(f"{key}={bad!r} is not a finite number; expected {_type_name(tp)} that is neither "
                        f"NaN nor infinite" + _fix_hint(key, meta))
    if meta.get("nonempty") and isinstance(value, str) and not value.strip():
        raise UserError(f"{key}= is empty; expected a non-empty string" + _fix_hint(key, meta))
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"{key}={value!r} is not allowed; expected one of: "
                        f"{', '.join(map(str, meta['choices']))}" + _fix_hint(key, meta))
    bounds = [(op, meta.get(name)) for name, op in _BOUNDS if meta.get(name) is not None]
    if value is not None and not all(_holds(value, op, limit) for op, limit in bounds):
        raise UserError(f"{key}={value!r} is out of range; expected a value "
                        + " and ".join(f"{op} {_number(limit)}" for op, limit in bounds) + _fix_hint(key, meta))
    return value


_BOUNDS = (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<"))
"""Field metadata keys of the bounds, and how each reads in an error."""


def _number(limit: float) -> str:
    return f"{limit:g}" if isinstance(limit, float) else str(limit)


def _holds(value: Any, op: str, limit: float) -> bool:
    return {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]


def _non_finite(value: Any) -> float | None:
    """The first NaN or infinity in ``value`` (a number, or a list or mapping of them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((bad for v in items if (bad := _non_finite(v)) is not None), None)


def _fix_hint(key: str, meta: dict) -> str:
    return f" ({meta['help']})" if meta.get("help") else ""


_type_hints = functools.cache(typing.get_type_hints)  # per class; resolving annotations is slow


def coerce_dataclass(cls: type, values: dict, prefix: str) -> Any:
    """Build ``cls`` from ``values``, naming the first unknown key or bad value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(f"unknown key '{where}{unknown[0]}'; expected one of: "
                        f"{', '.join(where + k for k in fields)}")
    hints = _type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = coerce_value(key, value, hints[name], dict(fields[name].metadata))
    try:
        return cls(**kwargs)
    except ValueError as err:  # a rule across fields (e.g. an interval's ends), stated by the class
        raise UserError(str(err)) from None


def build_run_config(raw: dict) -> RunConfig:
    """Composed dict -> RunConfig (the method dict is checked by ``method_config``)."""
    raw = dict(raw)
    groups = {g: coerce_dataclass(cls, raw.pop(g, {}) or {}, g) for g, cls in GROUP_CLASSES.items()}
    method = raw.pop("method")
    top_fields = {"seed", "nfe", "guidance", "results_dir"}
    unknown = sorted(set(raw) - top_fields)
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}'; expected a config group "
                        f"({', '.join(['method', *GROUP_CLASSES])}) or one of: {', '.join(sorted(top_fields))}")
    top = coerce_dataclass(_TopLevel, raw, "")
    return RunConfig(method=method, **groups, **dataclasses.asdict(top))


@dataclass(frozen=True)
class _TopLevel:
    seed: int = _spec(0, "training seed", min=0, max=MAX_SEED)
    nfe: int = _spec(1, "sampling steps (a comma list sweeps)", min=1, max=MAX_NFE)
    guidance: float = _spec(1.0, "guidance scale omega (1 = none)", min=1.0)
    results_dir: str = _spec("results", "the folder where runs, records and the MLflow store live",
                             semantic=False, nonempty=True)


def method_config(spec: Any, values: dict) -> Any:
    """The method's own config dataclass from the composed ``method`` dict."""
    values = {k: v for k, v in values.items() if k != "name"}
    return coerce_dataclass(spec.Config, values, "method")


def semantic_fields(obj: Any) -> dict:
    """The fields of a group config that change results (drops device, logging, ...).  A
    field added after results existed (``keyed_from_default=False`` in its metadata)
    enters only when set to something other than its default, so older keys still hold."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.metadata.get("semantic", True):
            continue
        value = getattr(obj, f.name)
        if f.metadata.get("omit_default") and value == f.default:
            continue
        out[f.name] = value
    return out
