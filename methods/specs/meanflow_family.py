"""Declarations shared by the average-velocity methods, MeanFlow and iMF (torch-free).
Not a method of its own: ``methods/specs/meanflow.py`` and ``methods/specs/imf.py`` build
on it; the shared runtime side is ``methods/meanflow_family.py``.

Both methods draw a time pair (t, r) from logit-normal laws with r = t on part of the
batch, drop labels in the official order, and weigh each sample's summed squared error
adaptively, dist / stopgrad((dist + c)^p) (docs/methods.md §4, §5, §6.11).  The fields for
these are declared here once; each method's own fields and defaults are in its spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.specs.base import MethodConfig, MethodSpec, check_choice, check_unit, train_field

SELECTIONS = ("first", "random")


@dataclass(frozen=True)
class MeanFlowFamilyConfig(MethodConfig):
    time_mean: float = train_field(-0.4, "logit-normal mean of t (and of r unless MeanFlow's r_time_mean is set)")
    time_std: float = train_field(1.0, "logit-normal std of t (and of r unless MeanFlow's r_time_std is set)",
        gt=0)
    ratio_r_neq_t: float = train_field(0.25, "fraction of the batch with r != t (official MeanFlow ImageNet 0.25, CIFAR 0.75)",
        min=0, max=1)
    r_neq_t_selection: str = train_field("first", "first: r = t for the first (1 - ratio) of the batch (official JAX); random: per-sample mask (py-meanflow)",
        choices=SELECTIONS)
    label_dropout: float = train_field(0.1, "null-label probability per sample (CFG training)",
        min=0, max=1)
    label_drop_position: str = train_field("first", "first: the first Binomial(B, p) samples (official, all in the r = t block); random: independent positions",
        choices=SELECTIONS)
    adaptive_p: float = train_field(1.0, "adaptive-weight power p in dist / (dist + c)^p (ImageNet 1.0, MeanFlow CIFAR 0.75, toys 0)",
        min=0)
    adaptive_c: float = train_field(0.01, "adaptive-weight offset c (ImageNet 0.01, MeanFlow CIFAR 1e-3); tuned for a per-sample SUM over dims",
        gt=0)

    def __post_init__(self) -> None:
        check_choice("r_neq_t_selection", self.r_neq_t_selection, SELECTIONS)
        check_choice("label_drop_position", self.label_drop_position, SELECTIONS)
        check_unit("ratio_r_neq_t", self.ratio_r_neq_t)
        check_unit("label_dropout", self.label_dropout)
        if self.time_std <= 0:
            raise ValueError(f"method.time_std={self.time_std} must be > 0")


class MeanFlowFamilySpec(MethodSpec):
    """Sampling costs one pass per step at any guidance: MeanFlow bakes guidance into
    training, iMF feeds it to the network."""

    def nfe_cost(self, cfg: MethodConfig, nfe: int, guidance: float) -> int:
        return nfe
