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
splits its batch into fixed fractions, because both sizes are multiples of 8).  So a count
costs two small steps, whatever the configured batch.

Training FLOPs per step enter every training record (``flops.train_per_step``,
``flops.train_total``) and every evaluation record beside the sampling FLOPs per sample
(``flops.sample_per_sample``); ``train.budget=flops:<method><steps>`` turns a FLOP budget
into a step count per method before training (:func:`resolve_budget`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from benchmark.schema import UserError

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
    """FLOPs of one training step of ``trainee`` (loss forward with any tangent pass, and
    backward) at ``batch_size``.  Gradients it leaves are cleared."""
    from benchmark.train import _micro_batch_loss

    params = list(trainee.net.parameters()) + list(trainee.method.parameters())

    def count_at(b: int) -> int:
        try:
            return count_flops(lambda: _micro_batch_loss(trainee, 0, 0, 0, b).backward())
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


_PER_STEP: dict[str, int] = {}


def per_step_flops(cfg, method_name: str, method_train: dict) -> int:
    """Training FLOPs per step of ``method_name`` (its training fields ``method_train``) at
    ``cfg``'s model, data and batch; memoised per process."""
    from benchmark.keys import canonical_json

    key = canonical_json({"method": method_name, "fields": method_train, "model": cfg.model.__dict__,
                          "data": [cfg.data.name, cfg.data.options], "batch": cfg.train.batch_size,
                          "micro": cfg.train.micro_batches})
    if key not in _PER_STEP:
        import dataclasses

        from benchmark.train import build_trainee

        counting = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
        trainee = build_trainee(counting, method_name, method_train)
        _PER_STEP[key] = train_step_flops(trainee, cfg.train.batch_size)
    return _PER_STEP[key]


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

    from benchmark.schema import DataConfig, EvalConfig, LauncherConfig, ModelConfig, RunConfig, TrainConfig
    from benchmark.schema import TrackingConfig

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
    (records written before FLOP accounting), rewriting each atomically; returns how many."""
    import json
    from pathlib import Path

    from benchmark.store import atomic_write_json
    from benchmark.train import build_trainee

    done = 0
    for config in sorted(Path(results_dir).glob("runs/*/config.json")):
        paths = [p for p in sorted(config.parent.glob("evals/*.json")) if "flops" not in json.loads(p.read_text())]
        if not paths:
            continue
        identity = json.loads(config.read_text())["identity"]
        cfg = config_from_identity(identity)
        trainee = build_trainee(cfg, identity["method"]["name"], {k: v for k, v in identity["method"].items()
                                                                  if k not in ("name", "version")})
        for path in paths:
            record = json.loads(path.read_text())
            record["flops"] = evaluation_flops(trainee, record["train_key"], cfg.train, record["nfe"],
                                               record["identity"]["guidance"], record.get("method_eval", {}))
            atomic_write_json(path, record)
            done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmark.flops [results_dir=DIR]``: backfill FLOP fields of old records."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    results_dir = "results"
    for arg in argv:
        key, _, value = arg.partition("=")
        if key != "results_dir" or not value:
            print(f"error: unknown argument {arg!r}; expected results_dir=DIR", file=sys.stderr)
            return 2
        results_dir = value
    try:
        print(f"added FLOP counts to {backfill(results_dir)} evaluation record(s) under {results_dir}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
