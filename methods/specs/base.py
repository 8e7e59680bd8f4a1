"""Torch-free method declarations: what the planner needs to know about a method.

Every method has a spec (this file's :class:`MethodSpec`) and an implementation
(``methods/<name>.py``, which imports torch).  The spec says which config fields are
training axes (one checkpoint each) and which are evaluation axes (reuse the checkpoint),
how the top-level ``guidance`` axis reaches the method, which NFE values it can honour and
how many backbone passes one sample costs.  The planner imports only specs, so a dry run
of a large sweep never imports torch.

Conventions (one for the whole suite, see the README and docs/methods.md §0): ``t = 1`` is noise, ``t = 0`` data;
``guidance = 1`` means no guidance; NFE is counted backbone passes per sample.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Axis = Literal["train", "eval"]


def train_field(default: Any, help: str, **checks: Any) -> Any:
    """A config field that changes the trained weights (part of the training key).
    ``checks``: what the planner refuses before anything runs, as in the config groups'
    schema: ``choices=(...)``, bounds ``min``/``max`` (inclusive), ``gt``/``lt`` (exclusive)."""
    return field(default=default, metadata={"axis": "train", "help": help, **_checks(checks)})


def eval_field(default: Any, help: str, **checks: Any) -> Any:
    """A config field used only at sampling time (part of the evaluation key); ``checks``
    as for :func:`train_field`."""
    return field(default=default, metadata={"axis": "eval", "help": help, **_checks(checks)})


def _checks(checks: dict) -> dict:
    unknown = sorted(set(checks) - {"choices", "min", "max", "gt", "lt"})
    if unknown:
        raise TypeError(f"unknown field check(s) {unknown}; expected choices, min, max, gt or lt")
    return checks


@dataclass(frozen=True)
class MethodConfig:
    """Base class of every method's config; subclasses declare fields with
    :func:`train_field` or :func:`eval_field`."""

    @classmethod
    def axis_of(cls, name: str) -> Axis:
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata["axis"]
        raise KeyError(name)

    @classmethod
    def fields_on(cls, axis: Axis) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.metadata["axis"] == axis]

    def inert_fields(self) -> tuple[str, ...]:
        """Training fields that cannot change the weights given the other fields' values
        (e.g. a teacher's decay with the teacher off); the training key leaves them out, so
        sweeping them there does not retrain."""
        return ()

    def split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(training fields, evaluation fields) as plain dicts; inert training fields are
        left out (the method then builds with their defaults, which it does not read)."""
        values = dataclasses.asdict(self)
        inert = set(self.inert_fields())
        train = {k: values[k] for k in self.fields_on("train") if k not in inert}
        evals = {k: values[k] for k in self.fields_on("eval")}
        return train, evals


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``method.<name>`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"method.{name}={value!r} is unknown; expected one of: {', '.join(allowed)}")


def check_unit(name: str, value: float) -> None:
    """Raise a ValueError naming ``method.<name>`` unless 0 <= value <= 1."""
    if not 0 <= value <= 1:
        raise ValueError(f"method.{name}={value} is out of range; expected a value in [0, 1]")


class InvalidPoint(ValueError):
    """An evaluation point a method cannot honour; the message names the allowed values."""


GuidanceMode = Literal["eval_cfg", "eval_input", "train", "none"]


class MethodSpec:
    """Declarations of one method.  Subclasses set the class attributes and may override
    the three hooks.

    guidance:
      - ``eval_cfg``: classic classifier-free guidance at sampling time; a guided step
        costs two backbone passes (Flow Matching, Shortcut).
      - ``eval_input``: guidance scale is a network input; no extra pass (iMF).
      - ``train``: guidance is baked in at training time; the top-level ``guidance`` value
        becomes the training field named by ``guidance_field`` (MeanFlow's omega).
      - ``none``: the method has no guidance; only ``guidance = 1`` is legal (sCT).
    """

    name: ClassVar[str]
    """The registry name: equal to the spec module's name, ``methods/specs/<name>.py``."""
    implementation: ClassVar[str]
    """``"methods.<module>:<Class>"``, the :class:`methods.base.Method` subclass (a class
    inside the methods package; the registry refuses anything else)."""
    order: ClassVar[int] = 1000
    """Position in ``METHOD_NAMES`` and so in every table (ascending; ties by name)."""
    version: ClassVar[int]
    Config: ClassVar[type[MethodConfig]]
    guidance: ClassVar[GuidanceMode] = "eval_cfg"
    guidance_field: ClassVar[str | None] = None
    step_cost_baseline: ClassVar[bool] = False
    """True on exactly one method (Flow Matching): every step-cost ratio divides by it."""
    step_cost_target: ClassVar[float | None] = None
    """The training-step time this method should reach, as a multiple of the baseline's
    step on the same backbone and batch (``python -m benchmark.stepcost`` checks it).  Near
    the physical limit: one JVP-based step is a forward with tangent plus a backward through
    the primal only, about 4/3 of an FM step."""
    step_cost_variants: ClassVar[tuple[str, ...]] = ()
    """Overrides (``model.conditioning_mode=in_context``) under which the step-cost table
    also measures this method, one row each, named ``<name>+<value>`` (no target)."""
    train_defaults: ClassVar[dict] = {}
    """Training-group values this method needs by default (its ``configs/method`` YAML sets
    them; a command-line ``train.*`` override still wins)."""

    def conditioning(self, cfg: MethodConfig) -> tuple[str, ...]:
        """Scalar inputs the backbone must embed (subset of t, r, h, d, omega, t_min, t_max)."""
        raise NotImplementedError

    def teacher_decay(self, cfg: MethodConfig) -> float | None:
        """Decay of a target network the method trains against (an EMA of the online net
        updated after every step, passed to ``loss`` as ``teacher``), or None for none.
        It is a training field of the method, separate from the evaluation EMA, which is
        post-hoc and the same for every method."""
        return None

    def teacher_rampup(self, cfg: MethodConfig) -> float:
        """Cap on the teacher's half-life as a fraction of the steps done (EDM's
        ``ema_rampup_ratio``), so it carries no memory of the initial weights and tracks the
        net early in training; 0 keeps the decay constant from step 0."""
        return 0.0

    def allowed_nfe(self, cfg: MethodConfig) -> tuple[int, ...] | None:
        """The NFE (steps) values this method can sample with; ``None`` means any NFE >= 1."""
        return None

    def nfe_cost(self, cfg: MethodConfig, nfe: int, guidance: float) -> int:
        """Backbone passes per sample for ``nfe`` steps at this guidance scale."""
        guided = self.guidance == "eval_cfg" and guidance != 1.0
        return nfe * (2 if guided else 1)

    def validate(self, cfg: MethodConfig, nfe: int, guidance: float) -> None:
        """Raise :class:`InvalidPoint` for an evaluation point this method cannot honour."""
        if not isinstance(nfe, int) or nfe < 1:
            raise InvalidPoint(f"nfe={nfe!r} is not a positive integer; expected nfe >= 1")
        allowed = self.allowed_nfe(cfg)
        if allowed is not None and nfe not in allowed:
            shown = ",".join(str(a) for a in allowed)
            raise InvalidPoint(
                f"{self.name} cannot sample with nfe={nfe}; allowed: nfe={shown}"
            )
        if guidance < 1.0 and self.guidance != "none":
            raise InvalidPoint(
                f"guidance={guidance} is below 1; expected guidance >= 1 (1 means no guidance)"
            )
        if self.guidance == "none" and guidance != 1.0:
            raise InvalidPoint(
                f"{self.name} has no classifier-free guidance; expected guidance=1, got {guidance}"
            )


def teacher_decay_at(decay: float, rampup: float, steps_done: int) -> float:
    """The teacher's decay for the update after ``steps_done`` optimizer steps: ``decay``,
    with its half-life ln 0.5 / ln decay capped at ``rampup * steps_done`` steps when
    ``rampup > 0`` (Karras et al. 2022, EDM training loop: ``ema_halflife_nimg =
    min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)``, ``beta = 0.5 ** (1 / halflife)``)."""
    if rampup <= 0.0 or decay <= 0.0:
        return decay
    halflife = min(math.log(0.5) / math.log(decay), rampup * steps_done)
    return 0.5 ** (1.0 / halflife) if halflife > 0 else 0.0
