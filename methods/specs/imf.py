"""Improved MeanFlow (iMF) declarations (torch-free).  Implementation: methods/imf.py.

Defaults follow the official Lyy-iiis/imeanflow training code (docs/methods.md §5): (t, r)
logit-normal(-0.4, 1.0), sorted, r = t for the first 50%; omega log-uniform on [1, 8]; CFG
interval t_min ~ U[0, 0.5], t_max ~ U[0.5, 1] ([0, 1] where r = t); adaptive weight
p = 1, c = 0.01; label drop 0.1 on the first samples; unconditional v at omega = 1.

One default differs from the released code and is switchable:
``v_head="boundary"``: v(z, t) := u(z, t, t), the u-net at h = 0, instead of the released
auxiliary v-head (``v_head="aux"``; ``aux_depth=8`` is the B/2 layout).  The boundary form
keeps every method on the same backbone with the same parameters (the suite's fairness
rule), builds on every backbone (the toy MLP has 4 layers) and keeps a training step near
2.2x a Flow Matching step (methods/imf.py), while the aux head adds ``aux_depth`` blocks to
every pass (8 of 12 for B/2) and parameters the other methods do not get.
The backbone's conditioning mode is a model axis shared by every method
(``model.conditioning_mode``): adaLN by default, like the other four methods, so an iMF row
differs from its neighbours only by the method; ``model.conditioning_mode=in_context`` gives
the official imfDiT's prefix tokens (to any method).
As in the official imfDiT the network has no t input (noise-conditioning-free);
``time_input=True`` adds one for toy data, where z alone does not reveal the noise level.

Guidance scale omega and interval are evaluation axes that cost no extra pass: the network
takes them as inputs, and sampling costs one pass per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.specs.base import (
    InvalidPoint,
    MethodConfig,
    check_choice,
    check_unit,
    eval_field,
    train_field,
)
from methods.specs.meanflow_family import MeanFlowFamilyConfig, MeanFlowFamilySpec

V_HEADS = ("boundary", "aux")
UNCOND_OMEGAS = ("one", "omega")


@dataclass(frozen=True)
class ImprovedMeanFlowConfig(MeanFlowFamilyConfig):
    """The family's fields (methods/specs/meanflow_family.py), iMF's default for
    ``ratio_r_neq_t``, and iMF's own fields."""

    ratio_r_neq_t: float = train_field(0.5, "fraction of the batch with r != t (official iMF 0.5)",
        min=0, max=1)
    omega_max: float = train_field(8.0, "omega drawn on [1, omega_max] (official s_max = 7, so 8)",
        min=1)
    omega_beta: float = train_field(1.0, "omega density ~ omega^-beta; 1 = log-uniform (official)")
    interval_split: float = train_field(0.5, "t_min ~ U[0, split], t_max ~ U[split, 1] (official 0.5)",
        min=0, max=1)
    uncond_omega: str = train_field("one", "one: v_u at omega = 1 (official code); omega: at the sampled omega (paper Algorithm 2, issue #8)",
        choices=UNCOND_OMEGAS)
    v_head: str = train_field("boundary", "boundary: v = u(z, h = 0) (paper; same backbone as other methods); aux: auxiliary v-head (released code)",
        choices=V_HEADS)
    aux_depth: int = train_field(8, "blocks duplicated into the aux v-head when v_head=aux (official 8); must be < model depth",
        min=1)
    time_input: bool = train_field(False, "also feed t (slot 't'); official: False (h only). Toys need True: 1-D/2-D z does not reveal t")
    interval_min: float = eval_field(0.0, "guidance interval start fed to the network at sampling (B/2 1-NFE: 0.40)",
        min=0, max=1)
    interval_max: float = eval_field(1.0, "guidance interval end fed to the network at sampling (B/2 1-NFE: 0.65)",
        min=0, max=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("uncond_omega", self.uncond_omega, UNCOND_OMEGAS)
        check_choice("v_head", self.v_head, V_HEADS)
        check_unit("interval_split", self.interval_split)
        if self.omega_max < 1:
            raise ValueError(f"method.omega_max={self.omega_max} is below 1; expected >= 1 (8 official)")
        if self.v_head == "aux" and (not isinstance(self.aux_depth, int) or self.aux_depth < 1):
            raise ValueError(
                f"method.aux_depth={self.aux_depth!r} with v_head=aux; expected an integer >= 1 "
                "below the model depth (official 8), or v_head=boundary"
            )


class ImprovedMeanFlowSpec(MeanFlowFamilySpec):
    name = "imf"
    implementation = "methods.imf:ImprovedMeanFlow"
    order = 30
    version = 2  # 2: unconditional data feed the interval [0, 1] to every sample
    step_cost_target = 1.8  # x an FM step; MeanFlow plus the boundary-velocity forward: about 5/3
    step_cost_variants = ("model.conditioning_mode=in_context",)  # the official imfDiT's prefix tokens
    Config = ImprovedMeanFlowConfig
    guidance = "eval_input"

    def conditioning(self, cfg: MethodConfig) -> tuple[str, ...]:
        slots = ("h", "omega", "t_min", "t_max")
        return ("t", *slots) if cfg.time_input else slots

    def validate(self, cfg: MethodConfig, nfe: int, guidance: float) -> None:
        super().validate(cfg, nfe, guidance)
        lo, hi = cfg.interval_min, cfg.interval_max
        if not 0 <= lo <= hi <= 1:
            raise InvalidPoint(
                f"imf guidance interval [{lo}, {hi}] is not an interval in [0, 1]; expected "
                "0 <= method.interval_min <= method.interval_max <= 1"
            )
