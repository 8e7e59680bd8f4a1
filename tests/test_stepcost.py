"""The step-cost benchmark measures a real training step of every method (smoke test;
timings are reported by the script, never asserted)."""

from __future__ import annotations

import pytest

from benchmark.stepcost import TARGETS, measure


@pytest.mark.parametrize("method", list(TARGETS))
def test_step_cost_worker_times_a_training_step_of_every_method(method: str) -> None:
    out = measure(method, "dit-tiny", batch=8, steps=2, device="cpu", threads=1)
    assert len(out["times"]) == 2 and all(t > 0 for t in out["times"])
    assert out["params"] > 0
