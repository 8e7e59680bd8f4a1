"""Training engine: exact resume, divergence stop, corrupt checkpoints, end-to-end reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.config import compose_points, merge_overrides
from benchmark.plan import plan_points
from benchmark.run import main
from benchmark.schema import UserError
from benchmark.store import Store
from benchmark.train import TrainingDiverged, load_state, train


def plan_for(overrides: list[str]):
    return plan_points(compose_points(overrides))


def assert_same_tensors(a: dict, b: dict, where: str = "") -> None:
    """Nested dicts of tensors are bitwise equal, key by key."""
    assert a.keys() == b.keys(), where
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
        else:
            assert torch.equal(a[k], b[k]), f"{where}/{k}"


def assert_same_final(a_store: Store, b_store: Store, key: str) -> None:
    """Both runs' final weights, EMA profiles and EMA snapshots are bitwise equal, and so
    are their loss curves."""
    cpu = torch.device("cpu")
    a, b = (load_state(s.final_path(key), cpu) for s in (a_store, b_store))
    assert_same_tensors({"net": a["net"], "ema": a["ema"]}, {"net": b["net"], "ema": b["ema"]})
    assert a["curve"] == b["curve"]
    snaps = [[p.name for p in s.ema_snapshot_paths(key)] for s in (a_store, b_store)]
    assert snaps[0] == snaps[1] and snaps[0]
    for name in snaps[0]:
        assert_same_tensors(*(load_state(s.run_dir(key) / "ema" / name, cpu)["profiles"]
                              for s in (a_store, b_store)), name)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(toy_overrides, tmp_path: Path) -> None:
    job = plan_for(toy_overrides).trainings[0]
    straight = Store(tmp_path / "straight")
    train(job, straight)
    resumed = Store(tmp_path / "resumed")
    train(job, resumed, stop_after=20)  # a checkpoint is written at step 20
    assert not resumed.is_trained(job.key)
    assert load_state(resumed.state_path(job.key), torch.device("cpu"))["step"] == 20
    train(job, resumed)
    assert_same_final(straight, resumed, job.key)


def test_a_preemption_warning_saves_the_exact_step_and_the_requeued_run_matches_the_straight_one(
        toy_overrides, tmp_path: Path, monkeypatch) -> None:
    """SIGUSR2 (SLURM's warning, handled by submitit) lands mid-step 7: the step finishes,
    the state is saved at step 8 (no periodic checkpoint is due: ckpt_every=1000), then the
    handler runs; resuming from there ends bitwise where the uninterrupted run does."""
    import os
    import signal

    import benchmark.train as engine

    job = plan_for(merge_overrides(toy_overrides, ["train.ckpt_every=1000"])).trainings[0]
    straight = Store(tmp_path / "straight")
    train(job, straight)

    seen = []

    def submitit_like(signum, frame):  # what submitit's handler does last: exit the task
        seen.append(signum)
        raise SystemExit(-1)

    step_fn = engine.train_step

    def step_with_warning(t, opt, params, tc, seed, step, micro, size):
        if step == 7:
            os.kill(os.getpid(), signal.SIGUSR2)  # delivered to the handler mid-step
        return step_fn(t, opt, params, tc, seed, step, micro, size)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    monkeypatch.setattr(engine, "train_step", step_with_warning)
    preempted = Store(tmp_path / "preempted")
    try:
        with pytest.raises(SystemExit):
            train(job, preempted)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    monkeypatch.undo()
    assert seen == [signal.SIGUSR2]
    assert load_state(preempted.state_path(job.key), torch.device("cpu"))["step"] == 8
    assert not preempted.is_trained(job.key)
    train(job, preempted)
    assert_same_final(straight, preempted, job.key)


def test_resume_from_a_step_between_checkpoints_replays_from_the_last_checkpoint(toy_overrides, tmp_path):
    job = plan_for(merge_overrides(toy_overrides, ["train.ckpt_every=15"])).trainings[0]
    store = Store(tmp_path)
    train(job, store, stop_after=23)  # killed at 23: the last periodic checkpoint is 15 ... and 23 on stop
    assert load_state(store.state_path(job.key), torch.device("cpu"))["step"] == 23
    train(job, store)
    assert store.is_trained(job.key)


def test_nan_loss_stops_the_run_naming_the_step(toy_overrides, tmp_path: Path) -> None:
    job = plan_for([*toy_overrides, "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0"]).trainings[0]
    store = Store(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"at step \d+"):
        train(job, store)
    assert not store.is_trained(job.key)


def test_corrupt_checkpoint_is_one_clear_error_naming_the_file(toy_overrides, tmp_path: Path) -> None:
    job = plan_for(toy_overrides).trainings[0]
    store = Store(tmp_path)
    store.state_path(job.key).parent.mkdir(parents=True)
    store.state_path(job.key).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="state.pt is unreadable"):
        train(job, store)


def test_checkpoint_with_pickled_code_is_refused(toy_overrides, tmp_path: Path) -> None:
    job = plan_for(toy_overrides).trainings[0]
    store = Store(tmp_path)
    store.state_path(job.key).parent.mkdir(parents=True)
    torch.save({"payload": Path("x")}, store.state_path(job.key))  # an arbitrary Python object
    with pytest.raises(UserError, match="unreadable"):
        train(job, store)


def test_rerunning_the_same_command_reuses_training_and_evaluations(toy_overrides, capsys) -> None:
    args = [*toy_overrides, "method=fm", "nfe=1,4", "tracking.enabled=false"]
    assert main(args) == 0
    first = capsys.readouterr().out
    store = Store(next(a.split("=", 1)[1] for a in toy_overrides if a.startswith("results_dir=")))
    records = sorted(store.root.glob("runs/*/evals/*.json"))
    assert len(records) == 2
    stamps = [p.stat().st_mtime_ns for p in records]
    assert main(args) == 0
    second = capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in records] == stamps
    table = lambda out: [ln for ln in out.splitlines() if ln.startswith("|")]  # noqa: E731
    assert table(first) == table(second)
    record = json.loads(records[0].read_text())
    assert record["nfe_counted"] == record["nfe"]
    assert {"swd", "mmd", "mean", "std"} <= set(record["metrics"])
