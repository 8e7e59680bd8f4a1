"""Torch-free facts the planner needs about datasets, backbones and metrics.

Versions salt cache keys: bump one when the code it names changes its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.metrics import FEATURE_EXTRACTOR_ID, TOY_METRIC_ID

BACKBONE_VERSIONS = {"dit": 1, "mlp": 1}


@dataclass(frozen=True)
class DatasetInfo:
    kind: str          # "image" or "toy": picks the backbone family and the metric
    conditional: bool  # has class labels (guidance is meaningful)
    version: int       # of the loader and its preprocessing
    metric: str        # metric suite (benchmark.evaluate.METRIC_SUITES)
    metric_id: str     # identity of its definitions and feature network (in evaluation keys)


DATASETS = {
    "digits": DatasetInfo("image", True, 1, "digits", FEATURE_EXTRACTOR_ID),
    **{name: DatasetInfo("toy", False, 1, "toy", TOY_METRIC_ID) for name in (
        "checkerboard", "eight_gaussians", "two_moons", "spirals", "gaussian1d", "gaussian2d")},
}


def dataset_info(name: str) -> DatasetInfo:
    from benchmark.schema import UserError

    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]
