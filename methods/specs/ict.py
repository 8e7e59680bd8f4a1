"""iCT (improved consistency training, discrete time) declarations (torch-free).
Implementation, the mapping to the suite's time and each deviation: methods/ict.py.
docs/methods.md §12.

Defaults are the CIFAR-10 settings of Song & Dhariwal, "Improved Techniques for Training
Consistency Models" (arXiv 2310.14189), in the paper's EDM noise levels sigma (x + sigma eps):
sigma in [0.002, 80], sigma_data 0.5, Karras grid with rho = 7, lognormal level sampling
(P_mean, P_std) = (-1.1, 2.0), curriculum s0 = 10, s1 = 1280, pseudo-Huber
c = 0.00054 sqrt(d).  The curriculum spans ``curriculum_steps`` training steps, which should
equal ``train.steps`` (the method does not see the training length).
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.specs.base import (
    InvalidPoint,
    MethodConfig,
    MethodSpec,
    check_unit,
    eval_field,
    train_field,
)


@dataclass(frozen=True)
class ICTConfig(MethodConfig):
    sigma_min: float = train_field(0.002, "smallest EDM noise level (the boundary f(x, sigma_min) = x)",
        gt=0)
    sigma_max: float = train_field(80.0, "largest EDM noise level (the 1-step sampler starts at sigma_max eps)",
        gt=0)
    sigma_data: float = train_field(0.5, "data std in c_skip, c_out, c_in", gt=0)
    rho: float = train_field(7.0, "Karras grid exponent of the discrete noise levels", gt=0)
    p_mean: float = train_field(-1.1, "lognormal level sampling: mean of ln sigma")
    p_std: float = train_field(2.0, "lognormal level sampling: std of ln sigma", gt=0)
    s0: int = train_field(10, "curriculum: N(0) - 1 discretisation steps at the start", min=1)
    s1: int = train_field(1280, "curriculum: N - 1 is doubled from s0 up to s1", min=1)
    curriculum_steps: int = train_field(3000, "K, the training steps the curriculum spans; set it to train.steps (default 3000)",
        min=1)
    huber_c: float | None = train_field(None, "pseudo-Huber c; None = 0.00054 sqrt(d), d the data dimension (paper)",
        gt=0)
    label_dropout: float = train_field(0.0, "per-sample null-label probability; iCT is trained unguided, labels condition the net",
        min=0, max=1)
    sigma_mid: float = eval_field(0.821, "EDM noise level the 2-step sampler re-noises to (CIFAR-10 value; see docs/methods.md §12)",
        gt=0)

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"method.sigma_min={self.sigma_min}, method.sigma_max={self.sigma_max}; "
                             "expected 0 < sigma_min < sigma_max (paper 0.002, 80)")
        if not (isinstance(self.s0, int) and isinstance(self.s1, int) and 1 <= self.s0 <= self.s1):
            raise ValueError(f"method.s0={self.s0!r}, method.s1={self.s1!r}; expected integers 1 <= s0 <= s1 (paper 10, 1280)")
        if not isinstance(self.curriculum_steps, int) or self.curriculum_steps < 1:
            raise ValueError(f"method.curriculum_steps={self.curriculum_steps!r}; expected an integer >= 1 (= train.steps)")
        if self.p_std <= 0 or self.sigma_data <= 0 or self.rho <= 0:
            raise ValueError("method.p_std, method.sigma_data and method.rho must be > 0")
        if self.huber_c is not None and self.huber_c <= 0:
            raise ValueError(f"method.huber_c={self.huber_c}; expected > 0, or null for 0.00054 sqrt(d)")
        check_unit("label_dropout", self.label_dropout)


class ICTSpec(MethodSpec):
    name = "ict"
    implementation = "methods.ict:ImprovedConsistencyTraining"
    order = 60
    version = 1
    step_cost_target = 1.4  # x an FM step; a no-grad forward, a forward and a backward: about 4/3
    Config = ICTConfig
    guidance = "none"

    def conditioning(self, cfg: MethodConfig) -> tuple[str, ...]:
        return ("t",)

    def allowed_nfe(self, cfg: MethodConfig) -> tuple[int, ...] | None:
        return (1, 2)

    def nfe_cost(self, cfg: MethodConfig, nfe: int, guidance: float) -> int:
        return nfe  # one pass per consistency step; no guidance pass exists

    def validate(self, cfg: MethodConfig, nfe: int, guidance: float) -> None:
        super().validate(cfg, nfe, guidance)
        if nfe == 2 and not cfg.sigma_min < cfg.sigma_mid < cfg.sigma_max:
            raise InvalidPoint(f"ict cannot re-noise to method.sigma_mid={cfg.sigma_mid}; expected "
                               f"{cfg.sigma_min} < sigma_mid < {cfg.sigma_max} (sigma_min, sigma_max)")
