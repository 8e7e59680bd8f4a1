"""Shortcut model declarations (torch-free).  Implementation: methods/shortcut.py.

Defaults are the official kvfrans/shortcut-models ImageNet/CelebA settings (docs/methods.md §2)
except ``bootstrap_cfg_scale`` (1.0 = off; the official ImageNet run used 1.5) and the decay
of the bootstrap teacher, ``teacher_decay`` = 0.99 instead of the official 0.999
(``target_update_rate``): the self-consistency targets come from that teacher, and at 0.999
the seven-level bootstrap chain lags so far behind in a few-thousand-step run that every
coarse level stays at chance (measured on digits at 3000 steps: the flow-matching level
reaches class accuracy 0.98 while 1-step samples stay at chance; 0.99 works).  A fixed
decay still lags a short run: at 300 steps the teacher's 100-step memory is a third of the
run and 1-step samples stay at chance (class accuracy 0.10), while the online net as
teacher gives 0.90.  So the teacher's half-life is also capped at ``teacher_rampup`` = 5% of
the steps done (the ramp-up rule of Karras et al. 2022, EDM's ``ema_rampup_ratio``): the
teacher follows the net closely early on and reaches 0.99 after about 1400 steps.  The
teacher is the method's own training field, separate from the suite's evaluation EMA.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.specs.base import MethodConfig, MethodSpec, train_field


def num_levels(denoise_timesteps: int) -> int:
    """log2(M) for a power of two M >= 2: the levels are k = 0..log2(M), d = 2^-k."""
    m = denoise_timesteps
    if not isinstance(m, int) or m < 2 or m & (m - 1):
        raise ValueError(
            f"method.denoise_timesteps={m!r} is not a power of two >= 2; "
            "expected e.g. 8, 16 or 128 (the official value)"
        )
    return m.bit_length() - 1


@dataclass(frozen=True)
class ShortcutConfig(MethodConfig):
    denoise_timesteps: int = train_field(128, "M: finest step 1/M is the flow-matching level; NFE must be a power of two <= M",
        min=2)
    bootstrap_every: int = train_field(8, "the first B // bootstrap_every samples of a batch get self-consistency targets",
        min=1)
    bootstrap_ema: bool = train_field(True, "self-consistency targets from the teacher, an EMA of the net (official); False: the online net")
    teacher_decay: float = train_field(0.99, "EMA decay of the bootstrap teacher (official 0.999; 0.99 fits few-thousand-step runs)",
        min=0, lt=1)
    teacher_rampup: float = train_field(0.05, "the teacher's half-life is at most this fraction of the steps done (EDM's ema_rampup_ratio); 0 = constant decay (official)",
        min=0)
    bootstrap_clip: float = train_field(4.0, "clip of the bootstrap midpoint and target to +-clip (tuned for SD-VAE latents)",
        gt=0)
    bootstrap_cfg_scale: float = train_field(1.0, "CFG scale baked into the smallest self-consistency level; 1 = off (official ImageNet 1.5)",
        min=1)
    label_dropout: float = train_field(0.1, "per-sample null-label probability on the flow-matching part only",
        min=0, max=1)
    eps_min: float = train_field(1e-5, "x_t = (1 - (1 - eps_min) t) noise + t data, FM target data - (1 - eps_min) noise",
        min=0, lt=1)

    def __post_init__(self) -> None:
        num_levels(self.denoise_timesteps)
        if not isinstance(self.bootstrap_every, int) or self.bootstrap_every < 1:
            raise ValueError(
                f"method.bootstrap_every={self.bootstrap_every!r} must be an integer >= 1 (official 8)"
            )
        if not 0.0 <= self.teacher_decay < 1.0:
            raise ValueError(f"method.teacher_decay={self.teacher_decay} must be in [0, 1) (official 0.999)")
        if not self.teacher_rampup >= 0.0:
            raise ValueError(f"method.teacher_rampup={self.teacher_rampup} must be >= 0 (0 = constant decay)")
        if not self.bootstrap_clip > 0:
            raise ValueError(f"method.bootstrap_clip={self.bootstrap_clip} must be > 0 (official 4)")

    def inert_fields(self) -> tuple[str, ...]:
        """Without the EMA teacher (bootstrap_ema=False) its decay and ramp-up do nothing."""
        return () if self.bootstrap_ema else ("teacher_decay", "teacher_rampup")


class ShortcutSpec(MethodSpec):
    name = "shortcut"
    implementation = "methods.shortcut:Shortcut"
    order = 40
    version = 1
    step_cost_target = 1.25  # x an FM step; a quarter of the batch adds two no-grad teacher passes
    Config = ShortcutConfig
    guidance = "eval_cfg"

    def teacher_decay(self, cfg: MethodConfig) -> float | None:
        return cfg.teacher_decay if cfg.bootstrap_ema else None

    def teacher_rampup(self, cfg: MethodConfig) -> float:
        return cfg.teacher_rampup

    def conditioning(self, cfg: MethodConfig) -> tuple[str, ...]:
        # "t": native time (t = 0 noise), raw; "d": the integer level k = log2(1/d), raw.
        return ("t", "d")

    def allowed_nfe(self, cfg: MethodConfig) -> tuple[int, ...]:
        """Powers of two up to M: one step of size d = 1/N needs the trained level log2(N)."""
        return tuple(2**k for k in range(num_levels(cfg.denoise_timesteps) + 1))
