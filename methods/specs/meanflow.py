"""MeanFlow declarations (torch-free).  Implementation: methods/meanflow.py.

Defaults are the official ImageNet settings of Gsunshine/meanflow (docs/methods.md §4):
(t, r) both logit-normal(-0.4, 1.0), sorted, r = t for the first 75% of the batch;
adaptive weight p = 1, c = 0.01 on the per-sample sum of squares; label drop 0.1 on the
first samples of the batch.  CIFAR-10 (py-meanflow) differs: 75% r != t chosen by a
random mask (``ratio_r_neq_t=0.75 r_neq_t_selection=random``), p = 0.75, c = 1e-3, and in
its ``v1`` sampler t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4.0, 1.6) paired by
clamping (``r_time_mean=-4.0 r_time_std=1.6 tr_pairing=clamp``).  Toy runs should use
``adaptive_p=0`` (docs/methods.md §10: p = 1 biases low-dimensional models) and the small-data
fraction ``ratio_r_neq_t=0.75``: at 0.25 only a quarter of the batch trains the one-step map,
which leaves MeanFlow under-trained in a 3000-step toy run (README, Toys).

Guidance is baked in at training time: the top-level ``guidance`` axis becomes ``omega``
(one checkpoint per value) and sampling costs one pass per step whatever the guidance.
With ``kappa > 0`` the effective CFG scale is ``omega / (1 - kappa)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.specs.base import MethodConfig, check_choice, train_field
from methods.specs.meanflow_family import MeanFlowFamilyConfig, MeanFlowFamilySpec

PAIRINGS = ("sort", "clamp")


@dataclass(frozen=True)
class MeanFlowConfig(MeanFlowFamilyConfig):
    """The family's fields (methods/specs/meanflow_family.py) plus MeanFlow's own."""

    r_time_mean: float | None = train_field(None, "separate logit-normal mean for r (py-meanflow v1: -4.0); None = time_mean")
    r_time_std: float | None = train_field(None, "separate logit-normal std for r (py-meanflow v1: 1.6); None = time_std",
        gt=0)
    tr_pairing: str = train_field("sort", "sort: (t, r) = (max, min) (official); clamp: r = min(t, r) after the r = t mask (py-meanflow v1)",
        choices=PAIRINGS)
    omega: float = train_field(1.0, "training-time CFG scale (the top-level guidance axis); 1 = no guidance",
        min=0)
    kappa: float = train_field(0.0, "weight of the network's conditional velocity in the guided target; effective scale omega / (1 - kappa)",
        min=0, lt=1)
    cfg_t_start: float = train_field(0.0, "guidance acts only for t in [cfg_t_start, cfg_t_end]",
        min=0, max=1)
    cfg_t_end: float = train_field(1.0, "guidance acts only for t in [cfg_t_start, cfg_t_end]",
        min=0, max=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("tr_pairing", self.tr_pairing, PAIRINGS)
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
        if self.r_time_std is not None and self.r_time_std <= 0:
            raise ValueError(f"method.r_time_std={self.r_time_std} must be > 0")


class MeanFlowSpec(MeanFlowFamilySpec):
    name = "meanflow"
    implementation = "methods.meanflow:MeanFlow"
    order = 20
    version = 1
    step_cost_target = 1.35  # x an FM step; forward with tangent + backward: about 4/3
    Config = MeanFlowConfig
    guidance = "train"
    guidance_field = "omega"

    def conditioning(self, cfg: MethodConfig) -> tuple[str, ...]:
        return ("t", "h")
