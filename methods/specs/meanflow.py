"""MeanFlow declarations (torch-free).  Implementation: methods/meanflow.py.

Defaults are the official ImageNet settings of Gsunshine/meanflow (docs/methods.md §4):
(t, r) both logit-normal(-0.4, 1.0), sorted, r = t for the first 75% of the batch;
adaptive weight p = 1, c = 0.01 on the per-sample sum of squares; label drop 0.1 on the
first samples of the batch.  CIFAR-10 (py-meanflow) differs: 75% r != t chosen by a
random mask (``ratio_r_neq_t=0.75 r_neq_t_selection=random``), p = 0.75, c = 1e-3, and in
its ``v1`` sampler t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4.0, 1.6) paired by
clamping (``r_time_mean=-4.0 r_time_std=1.6 tr_pairing=clamp``).  Toy runs should use
``adaptive_p=0`` (docs/methods.md §10: p = 1 biases low-dimensional models).

Guidance is baked in at training time: the top-level ``guidance`` axis becomes ``omega``
(one checkpoint per value) and sampling costs one pass per step whatever the guidance.
With ``kappa > 0`` the effective CFG scale is ``omega / (1 - kappa)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.specs.base import MethodConfig, MethodSpec, train_field

SELECTIONS = ("first", "random")
PAIRINGS = ("sort", "clamp")


@dataclass(frozen=True)
class MeanFlowConfig(MethodConfig):
    time_mean: float = train_field(-0.4, "logit-normal mean of t (and of r unless r_time_mean is set)")
    time_std: float = train_field(1.0, "logit-normal std of t (and of r unless r_time_std is set)")
    r_time_mean: float | None = train_field(None, "separate logit-normal mean for r (py-meanflow v1: -4.0); None = time_mean")
    r_time_std: float | None = train_field(None, "separate logit-normal std for r (py-meanflow v1: 1.6); None = time_std")
    tr_pairing: str = train_field("sort", "sort: (t, r) = (max, min) (official); clamp: r = min(t, r) after the r = t mask (py-meanflow v1)")
    ratio_r_neq_t: float = train_field(0.25, "fraction of the batch with r != t (official ImageNet 0.25, CIFAR 0.75)")
    r_neq_t_selection: str = train_field("first", "first: r = t for the first (1 - ratio) of the batch (official JAX); random: per-sample mask (py-meanflow)")
    omega: float = train_field(1.0, "training-time CFG scale (the top-level guidance axis); 1 = no guidance")
    kappa: float = train_field(0.0, "weight of the network's conditional velocity in the guided target; effective scale omega / (1 - kappa)")
    cfg_t_start: float = train_field(0.0, "guidance acts only for t in [cfg_t_start, cfg_t_end]")
    cfg_t_end: float = train_field(1.0, "guidance acts only for t in [cfg_t_start, cfg_t_end]")
    label_dropout: float = train_field(0.1, "null-label probability per sample (CFG training)")
    label_drop_position: str = train_field("first", "first: the first Binomial(B, p) samples (official, all in the r = t block); random: independent positions")
    adaptive_p: float = train_field(1.0, "adaptive-weight power p in dist / (dist + c)^p (ImageNet 1.0, CIFAR 0.75, toys 0)")
    adaptive_c: float = train_field(0.01, "adaptive-weight offset c (ImageNet 0.01, CIFAR 1e-3); tuned for a per-sample SUM over dims")

    def __post_init__(self) -> None:
        check_choice("tr_pairing", self.tr_pairing, PAIRINGS)
        check_choice("r_neq_t_selection", self.r_neq_t_selection, SELECTIONS)
        check_choice("label_drop_position", self.label_drop_position, SELECTIONS)
        check_unit("ratio_r_neq_t", self.ratio_r_neq_t)
        check_unit("label_dropout", self.label_dropout)
        if self.omega < 0 or not 0 <= self.kappa < 1:
            raise ValueError(
                f"method.omega={self.omega}, method.kappa={self.kappa} are out of range; "
                "expected omega >= 0 and 0 <= kappa < 1 (no guidance: omega=1 kappa=0)"
            )
        if not 0 <= self.cfg_t_start <= self.cfg_t_end <= 1:
            raise ValueError(
                f"method.cfg_t_start={self.cfg_t_start}, method.cfg_t_end={self.cfg_t_end} do not "
                "form an interval; expected 0 <= cfg_t_start <= cfg_t_end <= 1"
            )
        if self.time_std <= 0 or (self.r_time_std is not None and self.r_time_std <= 0):
            raise ValueError("method.time_std and method.r_time_std must be > 0")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``method.<name>`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"method.{name}={value!r} is unknown; expected one of: {', '.join(allowed)}")


def check_unit(name: str, value: float) -> None:
    """Raise a ValueError naming ``method.<name>`` unless 0 <= value <= 1."""
    if not 0 <= value <= 1:
        raise ValueError(f"method.{name}={value} is out of range; expected a value in [0, 1]")


class MeanFlowSpec(MethodSpec):
    name = "meanflow"
    version = 1
    step_cost_target = 1.35  # x an FM step; forward with tangent + backward: about 4/3
    Config = MeanFlowConfig
    guidance = "train"
    guidance_field = "omega"

    def conditioning(self, cfg: MethodConfig) -> tuple[str, ...]:
        return ("t", "h")

    def nfe_cost(self, cfg: MethodConfig, nfe: int, guidance: float) -> int:
        return nfe  # guidance is baked in: one pass per step
