"""Sweep planning: split sweep points into training jobs and evaluation jobs.  Torch-free.

Training axes (one checkpoint each): the method and its training fields, model, data,
training budget, seed.  Evaluation axes (reuse the checkpoint): nfe, guidance where the
method takes it at sampling time, the method's evaluation fields, the eval group.  A
guidance value a method takes at training time (MeanFlow's omega) becomes a training axis.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from benchmark.catalog import (
    BACKBONE_VERSIONS,
    DATA_LAYOUTS,
    DatasetInfo,
    check_data_options,
    data_files_fingerprint,
    dataset_info,
)
from benchmark.config import Point, group_choices
from benchmark.keys import canonical_json, short_hash
from benchmark.metrics.inception import extractor_weights_identity
from benchmark.metrics.reference_batch import check_reference_batch
from benchmark.schema import (
    FID_SUITE_FIELDS,
    EvalConfig,
    RunConfig,
    UserError,
    method_config,
    semantic_fields,
)
from benchmark.vae_weights import VAE_DECODERS, vae_identity
from methods.specs import InvalidPoint, get_spec


@dataclass
class TrainingJob:
    key: str
    config: RunConfig
    method_name: str
    method_train: dict[str, Any]
    identity: dict[str, Any]


@dataclass
class EvalJob:
    key: str
    train_key: str
    nfe: int
    nfe_counted: int
    guidance: float
    method_eval: dict[str, Any]
    identity: dict[str, Any]
    eval: EvalConfig = field(default_factory=lambda: EvalConfig())
    """This point's eval group (sample count, seed, EMA, ...): an evaluation axis, so it is
    the point's own, not the training job's."""

    @property
    def rung(self) -> bool:
        """An evaluation of an intermediate checkpoint (recorded under rungs/, not evals/)."""
        return self.identity["checkpoint"] != "final"

    def at_step(self, step: int) -> EvalJob:
        """The same evaluation of the checkpoint after ``step`` training steps."""
        identity = {**self.identity, "checkpoint": f"step-{step}"}
        return dataclasses.replace(self, key=short_hash(identity), identity=identity)


@dataclass
class Plan:
    trainings: list[TrainingJob] = field(default_factory=list)
    evaluations: list[EvalJob] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    origins: list[tuple[tuple[str, ...], str, str]] = field(default_factory=list)
    """(overrides, train key, eval key) of every planned sweep point: what made each key."""
    dry_run: bool = False  # files a run needs may be missing: noted in `unavailable`, not raised
    unavailable: list[str] = field(default_factory=list)


NOT_AVAILABLE = "not available"
"""Stands in an identity for what a dry run could not read (the key is then provisional)."""

T = TypeVar("T")


def _available(plan: Plan, find: Callable[[], T]) -> T | str:
    """``find()``, a check of files a run needs that raises UserError when they are missing.
    A real plan raises it (one line, before anything trains); a dry run records the reason in
    ``plan.unavailable`` and puts :data:`NOT_AVAILABLE` in the identity instead."""
    try:
        return find()
    except UserError as err:
        if not plan.dry_run:
            raise
        if str(err) not in plan.unavailable:
            plan.unavailable.append(str(err))
        return NOT_AVAILABLE


def provisional(identity: dict) -> bool:
    """Whether an identity (and so its key) holds a :data:`NOT_AVAILABLE` placeholder."""
    return NOT_AVAILABLE in canonical_json(identity)


def training_identity(cfg: RunConfig, method_name: str, method_train: dict, plan: Plan | None = None) -> dict:
    """Everything that changes the trained weights, versions included."""
    spec = get_spec(method_name)
    data = dataset_info(cfg.data.name)
    check_data_options(cfg.data.name, cfg.data.options)
    return {
        "method": {"name": method_name, "version": spec.version, **method_train},
        "model": {**semantic_fields(cfg.model), "backbone_version": BACKBONE_VERSIONS[cfg.model.backbone]},
        "data": _data_identity(cfg, data.version, plan or Plan()),
        "train": semantic_fields(cfg.train),
        "seed": cfg.seed,
    }


# Data options that say where files are or how to fetch them, not what they hold: the
# training key carries the files' fingerprint instead (a copied folder keeps its key); the
# autoencoder (vae) only decodes for evaluation, so its bytes enter evaluation keys instead.
LOCATION_OPTIONS = ("root", "download", "vae")


def _data_identity(cfg: RunConfig, version: int, plan: Plan) -> dict:
    """Name, options and loader version; datasets read from data.root add a fingerprint of
    their files (names and sizes, torch-free), fetching them first if download=true."""
    identity = {"name": cfg.data.name, "options": cfg.data.options, "version": version}
    if cfg.data.name not in DATA_LAYOUTS:
        return identity
    options = {k: v for k, v in cfg.data.options.items() if k not in LOCATION_OPTIONS}
    return {**identity, "options": options, "files": _available(plan, lambda: _data_files(cfg))}


def _data_files(cfg: RunConfig) -> str:
    """The fingerprint of the dataset's files, fetching them first if download=true."""
    root = cfg.data.options.get("root") or cfg.data.root
    try:
        return data_files_fingerprint(cfg.data.name, root)
    except UserError:
        if not (cfg.data.options.get("download") and DATA_LAYOUTS[cfg.data.name].download):
            raise
        from benchmark.data.torchvision_sets import download_dataset  # imports torch: only here

        download_dataset(cfg.data.name, root)
        return data_files_fingerprint(cfg.data.name, root)


def _metric_identity(cfg: RunConfig, data: DatasetInfo, plan: Plan) -> tuple[dict, object]:
    """The eval fields and metric id an evaluation key carries.  The fid suite's fields and
    the files it reads (feature network weights, an ADM reference batch, the latents'
    autoencoder; checked to exist here, before any training) enter only the keys of datasets
    that use that suite, and each only when used, so other keys are unchanged."""
    fields = semantic_fields(cfg.eval)
    if data.metric != "fid":
        return {k: v for k, v in fields.items() if k not in FID_SUITE_FIELDS}, data.metric_id
    ev = cfg.eval
    metric = {"id": data.metric_id,
              "weights": _available(plan, lambda: extractor_weights_identity(
                  ev.extractor, ev.backend, ev.inception_weights))}
    if ev.reference:
        metric["reference_batch"] = _available(plan, lambda: check_reference_batch(
            ev.reference, ev.extractor, ev.backend, ev.precision_recall))
    if cfg.data.options.get("decoder") in VAE_DECODERS:
        metric["vae"] = _available(plan, lambda: vae_identity(cfg.data.options.get("vae", "")))
    return fields, metric


def plan_points(points: list[Point], dry_run: bool = False) -> Plan:
    """Validate every point, dedupe trainings and evaluations by key.  ``dry_run``: files a
    run would read may be missing (see :func:`_available`)."""
    plan, seen_train, seen_eval, errors = Plan(dry_run=dry_run), {}, set(), []
    methods = {p.config.method.get("name") for p in points}
    notified = set()
    for point in points:
        try:
            job, ev = _plan_point(point, plan, notified)
        except InvalidPoint as err:
            errors.append(str(err))
            continue
        if job.key not in seen_train:
            seen_train[job.key] = job
            plan.trainings.append(job)
        if ev.key not in seen_eval:
            seen_eval.add(ev.key)
            plan.evaluations.append(ev)
        plan.origins.append((point.overrides, job.key, ev.key))
    if errors and (len(methods) == 1 or not plan.evaluations):
        raise UserError(errors[0])
    plan.skipped = list(dict.fromkeys(errors))
    if any(job.config.launcher.name == "slurm" for job in plan.trainings):
        _available(plan, _check_slurm)
    return plan


SLURM_COMMANDS = ("sbatch", "squeue")
"""What launcher=slurm runs (through submitit): without them nothing could be submitted."""


def _check_slurm() -> None:
    missing = [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd) is None]
    if missing:
        raise UserError(f"launcher=slurm needs SLURM's {' and '.join(missing)} on PATH and this machine has "
                        f"none; expected a SLURM login node, or launcher=local (parallel processes here) or "
                        f"launcher=inline")


def _plan_point(point: Point, plan: Plan, notified: set) -> tuple[TrainingJob, EvalJob]:
    cfg = point.config
    name = cfg.method.get("name")
    try:
        spec = get_spec(name)
    except KeyError as err:
        raise UserError(err.args[0] + " (configs/method/)") from None
    mcfg = method_config(spec, cfg.method)
    train_fields, eval_fields = mcfg.split()
    data = dataset_info(cfg.data.name)
    _check_backbone(cfg, data.kind)
    _check_aux_head(cfg, mcfg)
    if cfg.eval.num_samples is None:  # the dataset's default, resolved here so keys carry the number
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_samples=data.eval_samples))
    guidance = cfg.guidance
    if spec.guidance == "train":
        guidance = _training_guidance(cfg, spec, getattr(mcfg, spec.guidance_field))
        train_fields[spec.guidance_field] = guidance
        mcfg = dataclasses.replace(mcfg, **{spec.guidance_field: guidance})
        if guidance != 1.0 and name not in notified:
            notified.add(name)
            plan.notices.append(f"{name} takes guidance at training time: guidance becomes a "
                                f"training axis (method.{spec.guidance_field}), one checkpoint per value")
    conditional = data.conditional and cfg.data.options.get("conditional", True) is not False
    if not conditional and guidance != 1.0:
        raise InvalidPoint(f"guidance={guidance} needs class labels but data={cfg.data.name} is "
                           f"unconditional; expected guidance=1")
    spec.validate(mcfg, cfg.nfe, cfg.guidance)  # the axis; a method field (omega) checks its own range
    if cfg.train.budget:
        cfg = _budgeted(cfg, name, train_fields, plan)
    identity = training_identity(cfg, name, train_fields, plan)
    train_key = short_hash(identity)
    job = TrainingJob(train_key, cfg, name, train_fields, identity)
    eval_guidance = guidance if spec.guidance in ("eval_cfg", "eval_input") else 1.0
    eval_config, metric = _metric_identity(cfg, data, plan)
    eval_identity = {
        "train_key": train_key, "nfe": cfg.nfe, "guidance": eval_guidance,
        "method": eval_fields, "eval": eval_config, "checkpoint": "final",
        "metric": metric,
    }
    ev = EvalJob(short_hash(eval_identity), train_key, cfg.nfe,
                 spec.nfe_cost(mcfg, cfg.nfe, eval_guidance), guidance, eval_fields, eval_identity,
                 cfg.eval)
    return job, ev


def _budgeted(cfg: RunConfig, name: str, train_fields: dict, plan: Plan) -> RunConfig:
    """``cfg`` with ``train.steps`` set to what ``train.budget`` buys this method (FLOPs
    counted on the CPU on the real model: a second or two per method and model)."""
    from benchmark.flops import resolve_budget  # imports torch: only for budgeted runs

    def reference_fields(ref: str) -> dict:
        return method_config(get_spec(ref), {"name": ref}).split()[0]

    steps = resolve_budget(cfg, name, train_fields, reference_fields)
    notice = f"train.budget={cfg.train.budget}: {name} trains {steps:,} steps"
    if notice not in plan.notices:
        plan.notices.append(notice)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def _training_guidance(cfg: RunConfig, spec: Any, configured: float) -> float:
    """The guidance a method that takes it at training time trains with: the top-level
    ``guidance`` axis, or its own field (``method.omega``) when only that is set; MeanFlow's
    XL/2 setting (omega 0.2 with kappa 0.92) is below the axis's minimum of 1."""
    if cfg.guidance == 1.0 or configured in (1.0, cfg.guidance):
        return configured if cfg.guidance == 1.0 else cfg.guidance
    raise UserError(f"guidance={cfg.guidance:g} and method.{spec.guidance_field}={configured:g} both set "
                    f"{spec.name}'s training guidance; expected only one of them (guidance=W sweeps it)")


def _dit_depth(name: str) -> int:
    """The depth of a registered DiT size (``benchmark.backbones.sizes``); an unregistered
    name is refused."""
    from benchmark.backbones.sizes import dit_sizes

    sizes = dit_sizes()
    if name not in sizes:
        raise UserError(f"model.name={name!r} is not a DiT size; expected one of: {', '.join(sizes)} "
                        f"(or pick a model with model=dit-tiny ...)")
    return sizes[name]["depth"]


def _check_aux_head(cfg: RunConfig, mcfg: Any) -> None:
    """An auxiliary head (iMF's v_head=aux) duplicates the last blocks: it needs a shared trunk."""
    if getattr(mcfg, "v_head", None) != "aux":
        return
    depth = _dit_depth(cfg.model.name) if cfg.model.backbone == "dit" else cfg.model.depth
    if mcfg.aux_depth >= depth:
        raise UserError(f"method.aux_depth={mcfg.aux_depth} leaves no shared trunk in model={cfg.model.name} "
                        f"of depth {depth}; expected method.aux_depth < {depth} (or method.v_head=boundary)")


IGNORED_MODEL_FIELDS = {"dit": ("width", "depth"), "mlp": ("conditioning_mode", "label_init_std")}
"""model.* fields a backbone does not read (a DiT's size comes from its name): they stay at
their schema defaults, so a value there cannot change a key without changing the model."""


def _check_backbone(cfg: RunConfig, kind: str) -> None:
    if cfg.model.backbone == "dit" and cfg.model.name not in group_choices("model"):
        _dit_depth(cfg.model.name)
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg.model))}
    for name in IGNORED_MODEL_FIELDS[cfg.model.backbone]:
        value = getattr(cfg.model, name)
        if value != defaults[name]:
            other = "mlp" if cfg.model.backbone == "dit" else "dit-*"
            raise UserError(f"model.{name}={value!r} has no effect on model={cfg.model.name} (the "
                            f"{cfg.model.backbone} backbone does not read it); expected it unset (default "
                            f"{defaults[name]!r}), or a model={other} that reads it")
    expected = "dit" if kind == "image" else "mlp"
    if cfg.model.backbone != expected:
        raise UserError(f"model={cfg.model.name} is a {cfg.model.backbone} backbone but data="
                        f"{cfg.data.name} needs a {expected} backbone; expected "
                        + ("model=dit-tiny (or another dit-*)" if expected == "dit"
                           else "model=mlp train=toy"))
