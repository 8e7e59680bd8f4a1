"""sCM (continuous-time consistency training, sCT in TrigFlow) declarations (torch-free).
Implementation and the choices behind each default: methods/scm.py.  docs/methods.md §3."""

from __future__ import annotations

import math
from dataclasses import dataclass

from methods.specs.base import MethodConfig, MethodSpec, eval_field, train_field

PARAMETERIZATIONS = ("trigflow", "fm")
TANGENT_NORMS = ("l2", "rms", "none")


@dataclass(frozen=True)
class SCMConfig(MethodConfig):
    sigma_d: float = train_field(0.5, "TrigFlow data std sigma_d: x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2)",
        gt=0)
    parameterization: str = train_field("trigflow", "trigflow (net is F(x_t/sigma_d, t), slot t = TrigFlow t in [0, pi/2]) | fm (net is an FM velocity, converted to F; docs/methods.md §3)",
        choices=PARAMETERIZATIONS)
    time_mean: float = train_field(-1.0, "P_mean: tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d) (CIFAR-10 sCT)")
    time_std: float = train_field(1.4, "P_std (CIFAR-10 sCT)",
        gt=0)
    tangent_warmup_steps: int = train_field(1000, "H: warmup r = min(1, step / H); paper 10k, 1000 fits the few-thousand-step embedded budget; 0 = no warmup",
        min=0)
    rcm_warmup: bool = train_field(False, "rCM's warmup form: first term -cos t sqrt(1 - r^2 sin^2 t)(...) instead of -cos^2 t (...); equal at r = 1")
    tangent_norm: str = train_field("l2", "g / (||g|| + c): l2 (paper, rCM: norm over all non-batch dims) | rms (sCM-mnist: ||g|| / sqrt(D)) | none",
        choices=TANGENT_NORMS)
    tangent_norm_const: float = train_field(0.1, "c in g / (||g|| + c)",
        gt=0)
    adaptive_weight: bool = train_field(True, "learned log-variance u(t): loss e^{-u} mse + u (EDM2-style); false: plain mse")
    prior_weight: bool = train_field(False, "multiply each sample's error by 1 / (sigma_d tan t) (paper; sCM-mnist found it destabilising)")
    nan_mask: bool = train_field(False, "rCM: zero the target and prediction of samples whose F or tangent is not finite")
    label_dropout: float = train_field(0.0, "per-sample null-label probability; sCT is trained unguided, labels condition the net",
        min=0, max=1)
    t_max: float = eval_field(math.pi / 2, "TrigFlow time of the first step (noise end); rCM pi/2, sCM-mnist arctan(80/0.5) = 1.5645",
        gt=0, max=math.pi / 2)
    t_mid: float = eval_field(1.1, "TrigFlow time the 2-step sampler re-noises to (sCM-mnist)",
        gt=0, max=math.pi / 2)

    def __post_init__(self) -> None:
        if self.t_mid > self.t_max:
            raise ValueError(f"method.t_mid={self.t_mid} is above method.t_max={self.t_max}; expected the 2-step "
                             f"sampler to re-noise to a time t_mid <= t_max (e.g. method.t_mid=1.1)")


class SCMSpec(MethodSpec):
    name = "scm"
    implementation = "methods.scm:SCM"
    order = 50
    version = 1
    step_cost_target = 1.35  # x an FM step; forward with tangent + backward: about 4/3
    Config = SCMConfig
    guidance = "none"

    def conditioning(self, cfg: MethodConfig) -> tuple[str, ...]:
        return ("t",)

    def allowed_nfe(self, cfg: MethodConfig) -> tuple[int, ...] | None:
        return (1, 2)

    def nfe_cost(self, cfg: MethodConfig, nfe: int, guidance: float) -> int:
        return nfe  # one pass per consistency step; no guidance pass exists
