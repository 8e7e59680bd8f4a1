"""Flow Matching declarations (torch-free).  Implementation: methods/fm.py."""

from __future__ import annotations

from dataclasses import dataclass

from methods.specs.base import MethodConfig, MethodSpec, eval_field, train_field


@dataclass(frozen=True)
class FlowMatchingConfig(MethodConfig):
    time_sampler: str = train_field("logit_normal", "uniform | logit_normal (MF's sampler, for a fair comparison)",
        choices=("uniform", "logit_normal"))
    time_mean: float = train_field(-0.4, "logit-normal mean (MeanFlow's default, docs/methods.md §1)")
    time_std: float = train_field(1.0, "logit-normal std",
        gt=0)
    label_dropout: float = train_field(0.1, "per-sample probability of the null label (CFG training)",
        min=0, max=1)
    solver: str = eval_field("euler", "euler (one pass per step) | heun (two passes per step but the last)",
        choices=("euler", "heun"))


class FlowMatchingSpec(MethodSpec):
    name = "fm"
    implementation = "methods.fm:FlowMatching"
    order = 10
    version = 1
    step_cost_baseline = True  # the multi-step baseline: every step-cost ratio divides by it
    step_cost_target = 1.0
    step_cost_variants = ("model.conditioning_mode=in_context",)  # what the in-context backbone costs
    Config = FlowMatchingConfig
    guidance = "eval_cfg"

    def conditioning(self, cfg: MethodConfig) -> tuple[str, ...]:
        return ("t",)

    def nfe_cost(self, cfg: MethodConfig, nfe: int, guidance: float) -> int:
        passes = nfe if cfg.solver == "euler" else 2 * nfe - 1
        return passes * (2 if guidance != 1.0 else 1)
