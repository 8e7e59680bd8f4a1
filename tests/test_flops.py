"""FLOP accounting: FlopCounterMode against hand counts of a small DiT (the forward-mode
pass included), exact extrapolation over the batch, records that carry FLOPs, and
compute-matched budgets resolved to steps before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.backbones.dit import DiT
from benchmark.config import compose_points
from benchmark.flops import count_flops, parse_budget, train_step_flops
from benchmark.plan import plan_points
from benchmark.schema import UserError
from benchmark.train import _micro_batch_loss, build_trainee
from methods.jvp import backbone_jvp
from tests.conftest import run_cli

B, C, S, P, D, L, HEADS, K, RATIO, FREQ = 3, 2, 8, 2, 32, 2, 4, 10, 4, 256
N = (S // P) ** 2


def mm(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out  # one multiply-add = 2 FLOPs


ATTENTION = 2 * (2 * B * N * N * D)  # q k^T and (weights) v, per block
FORWARD = (mm(B * N, C * P * P, D)                      # patch embedding (a stride-p convolution)
           + mm(B, FREQ, D) + mm(B, D, D)               # the t embedder's MLP
           + L * (mm(B, D, 6 * D)                       # adaLN modulation
                  + mm(B * N, D, 3 * D) + ATTENTION + mm(B * N, D, D)
                  + mm(B * N, D, RATIO * D) + mm(B * N, RATIO * D, D))
           + mm(B, D, 2 * D) + mm(B * N, D, P * P * C))  # final adaLN and linear


@pytest.fixture(scope="module")
def dit() -> DiT:
    torch.manual_seed(0)
    return DiT(in_channels=C, image_size=S, patch_size=P, hidden=D, depth=L, heads=HEADS, num_classes=K,
               slots=("t",))


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(B, C, S, S), torch.rand(B), torch.randint(0, K, (B,))


def test_dit_forward_flops_equal_the_hand_count(dit: DiT) -> None:
    x, t, y = inputs()
    assert count_flops(lambda: dit(x, {"t": t}, y)) == FORWARD


def test_the_forward_mode_pass_is_counted_exactly(dit: DiT) -> None:
    """The hand-written JVP repeats every matmul once for the tangent, and attention's
    twice (d scores = dq k^T + q dk^T, d out = d weights v + weights dv)."""
    x, t, y = inputs()
    counted = count_flops(lambda: backbone_jvp(dit, x, {"t": t}, y, torch.randn_like(x), {"t": torch.ones(B)}))
    assert counted == 2 * FORWARD + L * ATTENTION


def test_torch_func_jvp_is_seen_too(dit: DiT) -> None:
    """A backbone without its own pass goes through ``torch.func.jvp``: its tangent work
    is dispatched and counted (more than the primal alone)."""
    x, t, y = inputs()
    counted = count_flops(lambda: torch.func.jvp(lambda a, b: DiT.forward(dit, a, {"t": b}, y), (x, t),
                                                 (torch.randn_like(x), torch.ones(B))))
    assert counted >= 2 * FORWARD


@pytest.mark.parametrize("method", ["fm", "shortcut", "meanflow"])
def test_training_flops_extrapolated_over_the_batch_equal_a_direct_count(method: str) -> None:
    """Counted at batches 8 and 16 and extended linearly: exactly the count at 128, also
    for Shortcut, whose batch splits into flow-matching and bootstrap parts."""
    job = plan_points(compose_points([f"method={method}", "train.device=cpu"])).trainings[0]
    t = build_trainee(job.config, job.method_name, job.method_train)
    direct = count_flops(lambda: _micro_batch_loss(t, 0, 0, 0, 128).backward())
    assert train_step_flops(t, 128) == direct
    assert all(p.grad is None for p in t.net.parameters())  # counting leaves no gradients


def per_step(method: str) -> int:
    job = plan_points(compose_points([f"method={method}", "train.device=cpu"])).trainings[0]
    return train_step_flops(build_trainee(job.config, job.method_name, job.method_train), 128)


def test_a_flops_budget_buys_each_method_the_steps_its_flops_allow() -> None:
    points = compose_points(["method=fm,meanflow,imf", "train.budget=flops:fm3000"])
    steps = {j.method_name: j.config.train.steps for j in plan_points(points).trainings}
    budget = 3000 * per_step("fm")
    assert steps["fm"] == 3000
    for method in ("meanflow", "imf"):
        cost = per_step(method)
        assert steps[method] * cost <= budget < (steps[method] + 1) * cost
    assert steps["imf"] < steps["meanflow"] < 3000
    plain = plan_points(compose_points(["method=fm"])).trainings[0]
    assert plan_points(compose_points(["method=fm", "train.budget=flops:fm3000"])).trainings[0].key == plain.key


def test_dry_run_shows_the_resolved_steps() -> None:
    proc = run_cli("method=fm,meanflow", "nfe=1", "train.budget=flops:fm3000", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    fm = next(line for line in proc.stdout.splitlines() if line.startswith("training") and "method=fm " in line)
    mf = next(line for line in proc.stdout.splitlines() if line.startswith("training") and "method=meanflow" in line)
    assert fm.endswith("steps=3000") and int(mf.rsplit("steps=", 1)[1]) < 3000
    assert "train.budget=flops:fm3000: meanflow trains" in proc.stdout + proc.stderr


@pytest.mark.parametrize("budget, named", [("flops:nosuch3000", "nosuch"), ("lots", "lots"),
                                           ("flops:fm0", "0 steps")])
def test_a_bad_budget_is_one_line_and_exit_2(budget: str, named: str) -> None:
    proc = run_cli("method=fm", f"train.budget={budget}", "--dry-run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in proc.stderr


def test_budget_grammar() -> None:
    assert parse_budget("flops:fm3000") == ("fm", 3000.0)
    assert parse_budget("FLOPS:1.5e15") == (None, 1.5e15)
    with pytest.raises(UserError, match="expected"):
        parse_budget("steps:10")


def test_every_record_carries_its_flops(toy_overrides: list[str]) -> None:
    from benchmark.run import main

    assert main([*toy_overrides, "method=fm,meanflow", "nfe=1,2", "tracking.enabled=false"]) == 0
    results = Path(next(o for o in toy_overrides if o.startswith("results_dir=")).split("=", 1)[1])
    records = [json.loads(p.read_text()) for p in results.glob("runs/*/evals/*.json")]
    assert len(records) == 4
    for r in records:
        f = r["flops"]
        assert f["train_total"] == f["train_per_step"] * 40 and f["sample_per_sample"] > 0
    by = {(r["method"], r["nfe"]): r["flops"] for r in records}
    for method in ("fm", "meanflow"):  # one pass per step: sampling FLOPs scale with the NFE
        assert by[(method, 2)]["sample_per_sample"] == 2 * by[(method, 1)]["sample_per_sample"]
    assert by[("meanflow", 1)]["train_per_step"] > by[("fm", 1)]["train_per_step"]
    summaries = [json.loads(p.read_text()) for p in results.glob("runs/*/summary.json")]
    assert all(s["flops"]["train_per_step"] > 0 for s in summaries)
    # older records without FLOPs get them from the backfill, equal to a fresh count
    for path in results.glob("runs/*/evals/*.json"):
        record = json.loads(path.read_text())
        expected = record.pop("flops")
        path.write_text(json.dumps(record))
        from benchmark.flops import backfill

        assert backfill(str(results)) == 1
        assert json.loads(path.read_text())["flops"] == expected
    # the command a user runs
    import subprocess
    import sys

    path = next(results.glob("runs/*/evals/*.json"))
    record = json.loads(path.read_text())
    expected = record.pop("flops")
    path.write_text(json.dumps(record))
    proc = subprocess.run([sys.executable, "-m", "benchmark.flops", f"results_dir={results}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "added FLOP counts to 1 evaluation record" in proc.stdout, proc.stderr
    assert json.loads(path.read_text())["flops"] == expected


@pytest.mark.parametrize("overrides", [["method=fm"], ["method=shortcut"],
                                       ["method=imf", "method.v_head=aux", "method.aux_depth=2"],
                                       ["method=meanflow", "model.conditioning_mode=in_context"]])
def test_the_estimate_from_small_stand_ins_equals_the_count_of_the_real_step(overrides: list[str]) -> None:
    """Random batches of 8 and 16 on DiTs of 1-3 blocks, extended to batch 128 and the full
    depth (and an aux head), give exactly the FLOPs of the real training step."""
    from benchmark.flops import estimate_train_flops

    job = plan_points(compose_points([*overrides, "train.device=cpu"])).trainings[0]
    trainee = build_trainee(job.config, job.method_name, job.method_train)
    assert estimate_train_flops(job.config, job.method_name, job.method_train) == train_step_flops(trainee, 128)


def test_the_backfill_command_refuses_a_folder_without_runs_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "benchmark.flops", f"results_dir={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no runs/ folder" in lines[0]
    assert subprocess.run([sys.executable, "-m", "benchmark.flops", "--help"], capture_output=True,
                          timeout=120).returncode == 0
