"""Mixed precision (train.precision=bf16) and compiled training (train.compile=true):
agreement with float32 eager training for every method, and whole runs on the CPU.

Tolerances: bf16 keeps 8 mantissa bits (relative rounding 2^-8 = 0.4%); the loss of one
batch agrees with float32 within 2% and its gradient within 5% (relative L2); the gradient
of FM and MeanFlow at their initial weights differed by 1.8e-3.  The compiled loss is the same arithmetic, reordered by the compiler:
1e-5 relative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.config import compose_points
from benchmark.plan import plan_points
from benchmark.train import _micro_batch_loss, build_trainee
from methods.specs import METHOD_NAMES


def loss_and_grad(method: str, *overrides: str) -> tuple[float, torch.Tensor]:
    """Loss and flat parameter gradient of one digits batch, weights moved off their
    (partly zero) init so every path carries signal."""
    job = plan_points(compose_points([f"method={method}", "train.device=cpu", *overrides])).trainings[0]
    t = build_trainee(job.config, job.method_name, job.method_train)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in t.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    if t.teacher is not None:
        t.teacher.load_state_dict(t.net.state_dict())
    loss = _micro_batch_loss(t, 0, 0, 7, 16)
    loss.backward()
    assert loss.dtype == torch.float32
    return loss.item(), torch.cat([p.grad.flatten() for p in t.net.parameters() if p.grad is not None])


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm()) if isinstance(a, torch.Tensor) else abs(a - b) / abs(b)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_bf16_loss_and_gradient_agree_with_float32(method: str) -> None:
    loss32, grad32 = loss_and_grad(method)
    loss16, grad16 = loss_and_grad(method, "train.precision=bf16")
    assert rel(loss16, loss32) < 2e-2 and rel(grad16, grad32) < 5e-2
    assert rel(grad16, grad32) > 0  # autocast really ran in bf16


def test_precision_enters_the_key_only_when_not_the_default() -> None:
    plain, fp32, bf16 = (plan_points(compose_points(["method=fm", *o])).trainings[0]
                         for o in ([], ["train.precision=fp32"], ["train.precision=bf16"]))
    assert plain.key == fp32.key != bf16.key and bf16.identity["train"]["precision"] == "bf16"
    assert "precision" not in plain.identity["train"]
    compiled = plan_points(compose_points(["method=fm", "train.compile=true"])).trainings[0]
    assert compiled.key == plain.key  # the same arithmetic: a compiled run reuses the eager one's results


def run_every_method(tmp_path: Path, toy_overrides: list[str], flag: str) -> list[dict]:
    from benchmark.run import main

    assert main([*toy_overrides, f"method={','.join(METHOD_NAMES)}", "nfe=1", "tracking.enabled=false",
                 flag]) == 0
    return [json.loads(p.read_text()) for p in (tmp_path / "results").glob("runs/*/evals/*.json")]


@pytest.mark.slow
def test_bf16_trains_and_evaluates_every_method_end_to_end(tmp_path: Path, toy_overrides: list[str]) -> None:
    records = run_every_method(tmp_path, toy_overrides, "train.precision=bf16")
    assert sorted(r["method"] for r in records) == sorted(METHOD_NAMES)
    assert all(torch.isfinite(torch.tensor(r["metrics"]["sw2"])) for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_compiled_loss_and_gradient_equal_eager(method: str) -> None:
    loss_e, grad_e = loss_and_grad(method)
    loss_c, grad_c = loss_and_grad(method, "train.compile=true")
    assert rel(loss_c, loss_e) < 1e-5 and rel(grad_c, grad_e) < 1e-5


@pytest.mark.slow
def test_compiled_training_runs_every_method_end_to_end(tmp_path: Path, toy_overrides: list[str]) -> None:
    records = run_every_method(tmp_path, toy_overrides, "train.compile=true")
    assert sorted(r["method"] for r in records) == sorted(METHOD_NAMES)
    assert all(torch.isfinite(torch.tensor(r["metrics"]["sw2"])) for r in records)
