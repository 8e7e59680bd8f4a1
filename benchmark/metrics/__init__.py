"""Metrics: FD / KID / class accuracy on digits, sliced Wasserstein / MMD on toys.

Importing this package is torch-free and instant: the planner puts the metric identities
below into evaluation cache keys without loading torch or torch-fidelity.  The functions
are imported on first use (``from benchmark.metrics import evaluate_digits`` works).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from typing import Any

# Everything that decides the digits feature network's weights, except the data (whose
# fingerprint salts the weight cache file; the train key carries it for evaluations).
DIGITS_CLASSIFIER_RECIPE: dict[str, Any] = {
    "arch": "digits-cnn",
    "arch_version": 1,     # bump when DigitClassifier's layers change
    "feature_dim": 64,     # penultimate width: the FD / KID feature space
    "features": "standardised-by-train",  # (raw - train mean) / train std per feature
    "epochs": 30,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "seed": 0,
    "quantisation": "uint8-255",  # the classifier trains on what it will be shown
}

FEATURE_EXTRACTOR_ID = (
    f"digits-cnn-v{DIGITS_CLASSIFIER_RECIPE['arch_version']}-"
    + hashlib.sha256(json.dumps(DIGITS_CLASSIFIER_RECIPE, sort_keys=True).encode()).hexdigest()[:8]
)
"""Name of the digits feature extractor in torch-fidelity's registry and in eval keys."""

TOY_METRIC_ID = "toy-swd1-sw2-mmdrbf-v2"
"""Identity of the toy metric definitions (bump when sliced W1 or the MMD kernel changes)."""

_LAZY = {
    "evaluate_digits": "benchmark.metrics.digits",
    "digits_floor": "benchmark.metrics.digits",
    "digits_fd_kid": "benchmark.metrics.digits",
    "class_accuracy": "benchmark.metrics.digits",
    "digit_features": "benchmark.metrics.digits",
    "frechet_distance": "benchmark.metrics.digits",
    "load_classifier": "benchmark.metrics.digits",
    "evaluate_toy": "benchmark.metrics.toy",
    "sliced_wasserstein": "benchmark.metrics.toy",
    "wasserstein_1d": "benchmark.metrics.toy",
    "mmd_rbf": "benchmark.metrics.toy",
}

__all__ = ["DIGITS_CLASSIFIER_RECIPE", "FEATURE_EXTRACTOR_ID", "TOY_METRIC_ID", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import a metric function from its module on first access (keeps this import light)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'benchmark.metrics' has no attribute {name!r}")
