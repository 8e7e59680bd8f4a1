"""FLOP accounting: training FLOPs per step and sampling FLOPs per sample, counted.

Counts come from ``torch.utils.flop_counter.FlopCounterMode``, which sees every matrix
multiply, convolution and attention the dispatcher runs, the forward-mode tangent pass of
the JVP methods included (it is made of ordinary ATen operators, dispatched like any
other).  As everywhere in the literature, elementwise work (activations, norms, the
optimizer and EMA updates) is not counted: a DiT step's FLOPs are its matmuls.  One
multiply-add counts as 2 FLOPs.

Counting runs the real computation on the real model, at two small batch sizes, and
extrapolates linearly to the configured batch (a step's FLOPs are affine in the batch:
per-sample work plus nothing else; the two points make that exact even where a method
splits its batch into fixed fractions, because both sizes are multiples of 8: Shortcut's
bootstrap part is 1/8 of the batch).  So a count
costs two small steps, whatever the configured batch.

Training FLOPs per step enter every training record (``flops.train_per_step``,
``flops.train_total``) and every evaluation record beside the sampling FLOPs per sample
(``flops.sample_per_sample``); ``train.budget=flops:<method><steps>`` turns a FLOP budget
into a step count per method before training (:func:`resolve_budget`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from fractions import Fraction

from benchmark.catalog import DATA_LAYOUTS
from benchmark.schema import UserError, parse_budget

SMALL_BATCHES = (8, 16)
"""The two batch sizes a count runs at (extrapolated to the configured batch)."""


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs ``fn()`` dispatches (matmul, convolution, attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _extrapolate(count_at: Callable[[int], int], batch: int) -> int:
    """``count_at(b)`` at the two small batches, extended linearly to ``batch``."""
    b1, b2 = SMALL_BATCHES
    if batch in SMALL_BATCHES:
        return count_at(batch)
    f1, f2 = count_at(b1), count_at(b2)
    return int(round(f1 + (f2 - f1) * (batch - b1) / (b2 - b1)))


def train_step_flops(trainee, batch_size: int) -> int:
    """FLOPs of one training step of ``trainee`` (a ``benchmark.train.Trainee``: loss
    forward with any tangent pass, and backward) at ``batch_size``, on the first training
    examples (FLOPs do not depend on the values).  Gradients it leaves are cleared."""
    import torch

    from methods.base import Batch

    params = list(trainee.net.parameters()) + list(trainee.method.parameters())
    ds = trainee.dataset

    def count_at(b: int) -> int:
        idx = torch.arange(b) % ds.train_x.shape[0]
        batch = Batch(ds.train_x[idx].to(trainee.device), ds.train_y[idx].to(trainee.device))
        gen = torch.Generator(device=trainee.device).manual_seed(0)
        try:
            # the eager loss: a compiled one would recompile at these batch sizes, and its
            # fused kernels are not what FlopCounterMode counts
            loss = lambda: trainee.method.loss(trainee.net, batch, step=0, generator=gen,  # noqa: E731
                                               teacher=trainee.teacher)[0]
            return count_flops(lambda: loss().backward())
        finally:
            for p in params:
                p.grad = None

    return _extrapolate(count_at, batch_size)


def sample_flops_per_sample(method, net, shape: tuple, num_classes: int, nfe: int, guidance: float,
                            eval_params: dict, device) -> int:
    """FLOPs to draw one sample with ``nfe`` steps at ``guidance`` (the slope of the count
    over the batch: per-sample work, guidance passes included)."""
    import torch

    def count_at(b: int) -> int:
        noise = torch.zeros(b, *shape, device=device)
        labels = torch.zeros(b, dtype=torch.long, device=device) % max(num_classes, 1)
        with torch.no_grad():
            return count_flops(lambda: method.sample(net, noise, labels, nfe=nfe, guidance=guidance,
                                                     fresh_noise=lambda i: torch.zeros_like(noise),
                                                     **eval_params))

    b1, b2 = SMALL_BATCHES
    return int(round((count_at(b2) - count_at(b1)) / (b2 - b1)))


# ----------------------------------------------------------------------------------------
# Budgets

def per_step_flops(cfg, method_name: str, method_train: dict) -> int:
    """Training FLOPs per step of ``method_name`` (training fields ``method_train``) at
    ``cfg``'s model, data and batch (:func:`estimate_train_flops`, exact; memoised)."""
    per_step = _estimate(cfg, method_name, method_train)
    if per_step is None:
        raise UserError(f"train.budget={cfg.train.budget!r} needs the FLOPs of {method_name} on data={cfg.data.name}, "
                        f"whose sample shape is unknown until its files exist; expected data.root to hold them, "
                        f"or give train.steps instead")
    return per_step


def resolve_budget(cfg, method_name: str, method_train: dict, reference_train: Callable[[str], dict]) -> int:
    """The step count ``cfg.train.budget`` buys ``method_name``: the budget's FLOPs over the
    method's FLOPs per step, rounded down (never above the budget), at least 1.
    ``reference_train(name)`` gives a reference method's training fields (its defaults)."""
    ref, amount = parse_budget(cfg.train.budget)
    if ref is None:
        total = amount
    else:
        from methods.specs import get_spec

        try:
            get_spec(ref)
        except KeyError as err:
            raise UserError(f"train.budget={cfg.train.budget!r} names {ref!r}: " + err.args[0]) from None
        ref_fields = method_train if ref == method_name else reference_train(ref)
        total = amount * per_step_flops(cfg, ref, ref_fields)
    return max(1, int(total // per_step_flops(cfg, method_name, method_train)))


# ----------------------------------------------------------------------------------------
# Records

_TRAIN_PER_STEP: dict[str, int] = {}


def evaluation_flops(trainee, train_key: str, train_cfg, nfe: int, guidance: float, method_eval: dict) -> dict:
    """The ``flops`` field of an evaluation record: training FLOPs per step and in total
    (memoised per training in this process) and sampling FLOPs per sample at this point."""
    if train_key not in _TRAIN_PER_STEP:
        _TRAIN_PER_STEP[train_key] = train_step_flops(trainee, train_cfg.batch_size)
    per_step = _TRAIN_PER_STEP[train_key]
    ds = trainee.dataset
    sample = sample_flops_per_sample(trainee.method, trainee.net, tuple(ds.shape), ds.num_classes, nfe, guidance,
                                     method_eval, trainee.device)
    return {"train_per_step": per_step, "train_total": per_step * train_cfg.steps, "sample_per_sample": sample}


def config_from_identity(identity: dict):
    """A RunConfig that builds the same trainee as the training ``identity`` (config.json)."""
    import dataclasses

    from benchmark.schema import (
        DataConfig,
        EvalConfig,
        LauncherConfig,
        ModelConfig,
        RunConfig,
        TrackingConfig,
        TrainConfig,
    )

    def known(cls, values: dict) -> dict:
        names = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in values.items() if k in names}

    data = identity["data"]
    return RunConfig(method={k: v for k, v in identity["method"].items() if k != "version"},
                     model=ModelConfig(**known(ModelConfig, identity["model"])),
                     data=DataConfig(name=data["name"], options=dict(data.get("options", {}))),
                     train=dataclasses.replace(TrainConfig(**known(TrainConfig, identity["train"])), device="cpu"),
                     eval=EvalConfig(), tracking=TrackingConfig(), launcher=LauncherConfig(),
                     seed=identity.get("seed", 0))


def backfill(results_dir: str) -> int:
    """Add the ``flops`` field to every evaluation record of ``results_dir`` that lacks it
    (records written before FLOP accounting), rewriting each atomically; returns how many.
    Counted like :func:`estimate_train_flops`, on a freshly built network (FLOPs do not
    depend on the weights)."""
    import json
    from pathlib import Path

    from benchmark.store import atomic_write_json

    done = 0
    for config in sorted(Path(results_dir).glob("runs/*/config.json")):
        paths = [p for p in sorted(config.parent.glob("evals/*.json")) if "flops" not in json.loads(p.read_text())]
        if not paths:
            continue
        identity = json.loads(config.read_text())["identity"]
        cfg = config_from_identity(identity)
        name = identity["method"]["name"]
        fields = {k: v for k, v in identity["method"].items() if k not in ("name", "version")}
        per_step = per_step_flops(cfg, name, fields)
        shape, classes = _shape_and_classes(cfg)
        method, net = _method_and_net(cfg, name, fields, shape, classes)
        for path in paths:
            record = json.loads(path.read_text())
            sample = sample_flops_per_sample(method, net, shape, classes, record["nfe"], record["identity"]["guidance"],
                                             record.get("method_eval", {}), "cpu")
            record["flops"] = {"train_per_step": per_step, "train_total": per_step * cfg.train.steps,
                               "sample_per_sample": sample}
            atomic_write_json(path, record)
            done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmark.flops [results_dir=DIR]``: backfill FLOP fields of old records."""
    from pathlib import Path

    from benchmark.cli import entry

    def body(argv: list[str]) -> int:
        results_dir = "results"
        for arg in argv:
            key, _, value = arg.partition("=")
            if key != "results_dir" or not value:
                raise UserError(f"unknown argument {arg!r}; expected results_dir=DIR")
            results_dir = value
        if not Path(results_dir, "runs").is_dir():
            raise UserError(f"results_dir={results_dir} holds no runs/ folder; expected the results folder of "
                            f"benchmark.run (default results/)")
        print(f"added FLOP counts to {backfill(results_dir)} evaluation record(s) under {results_dir}")
        return 0

    return entry(body, argv, "usage: python -m benchmark.flops [results_dir=DIR]\n\nAdd counted FLOPs to the "
                 "evaluation records under DIR (default results/) written before FLOP accounting.")



# ----------------------------------------------------------------------------------------
# Estimates before any data exists (paper presets at DiT-XL scale)

STANDIN_SHAPES = {"cifar10": ((3, 32, 32), 10), "mnist": ((1, 28, 28), 10), "latents": ((4, 32, 32), 1000)}
"""Per-sample shape and classes a dataset on disk is assumed to have when it is not there
(latents: the SD-VAE latents of 256x256 images, classes from ``data.options.num_classes``)."""

SUSTAINED_FLOPS = 400e12
"""Training throughput assumed for GPU-hour estimates: 40% of an H100's dense bf16 peak
(989 TFLOP/s).  ``scripts/gpu_check.sh`` measures what a given GPU sustains."""


def _shape_and_classes(cfg) -> tuple[tuple, int] | None:
    from benchmark.data import load_dataset

    name = cfg.data.name
    try:
        ds = load_dataset(name, **cfg.data.options)
        return tuple(ds.shape), ds.num_classes
    except (UserError, OSError, FileNotFoundError):
        if name not in DATA_LAYOUTS:  # data that is always there (digits, toys): a real error
            raise
        if name not in STANDIN_SHAPES:
            return None
        shape, classes = STANDIN_SHAPES[name]
        return shape, int(cfg.data.options.get("num_classes") or classes)


def _method_and_net(cfg, method_name: str, method_train: dict, shape: tuple, classes: int,
                    options: dict | None = None, build: bool = True):
    """(the method, a freshly built backbone for it at ``shape`` with ``options`` over the
    method's own backbone options), as training builds them; ``build=False``: no net."""
    import torch

    from benchmark.backbones import build_backbone
    from benchmark.schema import method_config
    from methods import get_method, get_spec

    mcfg = method_config(get_spec(method_name), {**cfg.method, **method_train, "name": method_name})
    method = get_method(method_name)(mcfg, classes)
    if not build:
        return method, None
    torch.manual_seed(0)
    return method, build_backbone(cfg.model, shape=shape, num_classes=classes, slots=method.conditioning,
                                  options={**method.backbone_options(), **(options or {})})


def _lagrange(nodes: tuple[int, ...], at: int) -> list[Fraction]:
    """Weights w_j with p(at) = sum_j w_j p(nodes_j) for every polynomial p of degree
    < len(nodes)."""
    out = []
    for j, xj in enumerate(nodes):
        w = Fraction(1)
        for m, xm in enumerate(nodes):
            if m != j:
                w *= Fraction(at - xm, xj - xm)
        out.append(w)
    return out


def estimate_train_flops(cfg, method_name: str, method_train: dict) -> int | None:
    """Training FLOPs per step of a configuration, counted without training data and
    without building the full model, exactly.  A DiT step's FLOPs are affine in the batch,
    affine in its numbers of trunk and head blocks, and quadratic in its patch-token count
    (attention), so counts on random batches of 8 and 16, DiTs of 1-3 blocks and images of
    1, 4 and 9 patches extend exactly to the configured batch, depth and image
    (tests/test_flops.py checks the extension against the real step).  None when the data's
    shape is unknown (a folder of images not present)."""
    import torch

    from methods.base import Batch

    found = _shape_and_classes(cfg)
    if found is None:
        return None
    shape, classes = found
    method, _ = _method_and_net(cfg, method_name, method_train, shape, classes, build=False)
    options = method.backbone_options()
    aux = int(options.get("aux_depth", 0))
    dit = cfg.model.backbone == "dit"
    has_teacher = method.spec.teacher_decay(method.cfg) is not None

    def count(b: int, depth: int, aux_depth: int, side: int | None) -> int:
        x_shape = (shape[0], side, side) if dit else shape
        _, net = _method_and_net(cfg, method_name, method_train, x_shape, classes,
                                 {"aux_depth": aux_depth, **({"depth": depth} if dit else {})})
        teacher = copy.deepcopy(net).requires_grad_(False) if has_teacher else None
        gen = torch.Generator().manual_seed(0)
        batch = Batch(torch.randn(b, *x_shape, generator=gen), torch.randint(0, max(classes, 1), (b,), generator=gen))
        return count_flops(lambda: method.loss(net, batch, step=0, generator=gen, teacher=teacher)[0].backward())

    # SMALL_BATCHES (8, 16): multiples of every method's batch fractions (Shortcut's 1/8)
    batch_terms = list(zip(SMALL_BATCHES, _lagrange(SMALL_BATCHES, cfg.train.batch_size)))
    if not dit:
        return int(round(sum(w * count(b, 0, aux, None) for b, w in batch_terms)))
    from benchmark.backbones.sizes import dit_sizes

    size = dit_sizes()[cfg.model.name]
    depth, patch = size["depth"], options.get("patch_size", size["patch_size"])
    tokens = (shape[1] // patch) * (shape[2] // patch)
    token_terms = list(zip((1, 2, 3), _lagrange((1, 4, 9), tokens)))  # image sides p, 2p, 3p
    if aux:  # f = k0 + k_trunk (depth - aux) + k_head aux, from (depth, aux) = (2,1), (3,1), (3,2)
        depth_terms = [((2, 1), Fraction(3 - depth)), ((3, 1), Fraction(depth - aux - 1)), ((3, 2), Fraction(aux - 1))]
    else:
        depth_terms = list(zip(((1, 0), (2, 0)), _lagrange((1, 2), depth)))
    total = sum(wb * wd * wk * count(b, d, a, k * patch)
                for b, wb in batch_terms for (d, a), wd in depth_terms for k, wk in token_terms)
    return int(round(total))


_ESTIMATES: dict[str, int | None] = {}


def _estimate(cfg, method_name: str, method_train: dict) -> int | None:
    """:func:`estimate_train_flops`, memoised per process and configuration."""
    from benchmark.keys import canonical_json

    key = canonical_json({"method": method_name, "fields": method_train, "model": cfg.model.__dict__,
                          "data": [cfg.data.name, cfg.data.options], "batch": cfg.train.batch_size})
    if key not in _ESTIMATES:
        _ESTIMATES[key] = estimate_train_flops(cfg, method_name, method_train)
    return _ESTIMATES[key]


def cost_estimate_line(cfg, method_name: str, method_train: dict) -> str:
    """``training ≈ 2.1e+21 FLOPs (1.8e+15 per step), ≈ 1,460 GPU-hours at 400 TFLOP/s``."""
    per_step = _estimate(cfg, method_name, method_train)
    if per_step is None:
        return "training FLOPs: not estimated (the data's shape is unknown until its files exist)"
    total = per_step * cfg.train.steps
    seconds = total / SUSTAINED_FLOPS
    spent = f"{seconds / 3600:,.1f} GPU-hours" if seconds >= 360 else f"{seconds:.2g} GPU-seconds"
    return (f"training ≈ {total:.2e} FLOPs ({per_step:.2e} per step, counted), ≈ {spent} at "
            f"{SUSTAINED_FLOPS / 1e12:.0f} TFLOP/s sustained (40% of an H100's bf16 peak)")


if __name__ == "__main__":
    raise SystemExit(main())
