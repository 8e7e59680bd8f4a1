"""Data-parallel training: two processes follow the one-process path of the same
micro-batch count, for Flow Matching and for the JVP methods (which a DDP wrapper would
silently bypass), and a skipped gradient all-reduce is caught.

Two CPU processes over gloo, spawned on a free local port.  Tolerance: per-step losses and
final weights within 1e-5 relative (they agree bit for bit here: two micro-batches sum in
the same order in both layouts, and gloo's two-rank sum is commutative).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from benchmark.config import compose_points, merge_overrides
from benchmark.plan import plan_points
from benchmark.schema import UserError
from benchmark.store import Store
from benchmark.train import build_trainee, load_state, train

REPO = Path(__file__).resolve().parents[1]
JVP_METHODS = ("meanflow", "scm")  # scm: also a method with its own parameters (the log-variance head)
METHODS = ("fm", *JVP_METHODS)


def tiny(method: str, results: Path, *extra: str) -> list[str]:
    """20 steps of batch 64 in two micro-batches, a checkpoint at step 10, a curve point per step."""
    return merge_overrides(
        [f"method={method}", "data=gaussian1d", "model=mlp", "train=toy", "train.steps=20",
         "train.batch_size=64", "train.micro_batches=2", "train.warmup_steps=5", "train.log_every=1",
         "train.ckpt_every=10", "train.progress=false", "train.device=cpu", "train.threads=1",
         "tracking.enabled=false", f"results_dir={results}"], list(extra))


def job_for(overrides: list[str]):
    return plan_points(compose_points(overrides)).trainings[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, runs: dict, cli: list[str], out: str) -> None:
    """One rank: train every run in ``runs`` (name -> (job, results_dir, sabotage)) in order,
    then run the command line ``cli``; save this rank's weights, or the error a run stopped
    with, and the command's exit code and output to ``out/rank<r>.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from benchmark import distributed

    real = distributed.all_reduce_grads, distributed.check_replicas
    results = {}
    for name, (job, results_dir, sabotage) in runs.items():
        distributed.all_reduce_grads, distributed.check_replicas = real
        if "no_all_reduce" in sabotage:  # what calling model.module under DDP amounts to
            distributed.all_reduce_grads = lambda params: None
        if "no_replica_check" in sabotage:  # leaves the weight comparison to the test
            distributed.check_replicas = lambda params, step: None
        try:
            if "interrupted_at_10" in sabotage:  # a first job killed after its step-10 checkpoint
                train(job, Store(results_dir), stop_after=10)
            t = train(job, Store(results_dir))
            results[name] = {"net": t.net.state_dict(), "method": t.method.state_dict(),
                             "ema": t.ema.state_dict()["0.1"]}
        except (UserError, distributed.ReplicasDiverged) as err:
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    distributed.all_reduce_grads, distributed.check_replicas = real
    results["partial_grads"] = _reduce_partial_grads(rank)
    results["cli"] = _run_cli(cli)  # last: the command leaves the process group when done
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _reduce_partial_grads(rank: int) -> dict:
    """All-reduce three parameters: a gradient on both ranks, on rank 0 only, on neither."""
    from benchmark.distributed import all_reduce_grads

    both, first, neither = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), float(rank + 1))
    if rank == 0:
        first.grad = torch.tensor([1.0, 2.0, 3.0])
    all_reduce_grads([both, first, neither])
    return {"both": both.grad, "first": first.grad, "neither": neither.grad is None}


def _run_cli(args: list[str]) -> dict:
    """``python -m benchmark.run args`` in this rank, as torchrun would start it."""
    import contextlib
    import io

    from benchmark.run import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return {"code": code, "stdout": out.getvalue()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Every two-process run of this file, in one spawn (a spawn costs seconds of imports):
    each method on its own, 1 micro-batch (cannot be shared), MeanFlow stopped at step 10 and
    resumed, MeanFlow with the gradient all-reduce taken out (once with the engine's replica
    check, once without), and last the command line ``benchmark.run`` as torchrun starts it."""
    root = tmp_path_factory.mktemp("two_ranks")
    runs = {m: (job_for(tiny(m, root / "two")), root / "two", ()) for m in METHODS}
    runs["indivisible"] = (job_for(tiny("fm", root / "two", "train.micro_batches=1")), root / "two", ())
    runs["resumed"] = (job_for(tiny("meanflow", root / "resumed")), root / "resumed", ("interrupted_at_10",))
    runs["no_all_reduce"] = (job_for(tiny("meanflow", root / "a")), root / "a", ("no_all_reduce",))
    runs["no_all_reduce_unchecked"] = (job_for(tiny("meanflow", root / "b")), root / "b",
                                       ("no_all_reduce", "no_replica_check"))
    cli = [*tiny("meanflow", root / "cli"), "nfe=1", "eval.num_samples=200"]
    (root / "out").mkdir()
    mp.spawn(_worker, args=(2, free_port(), runs, cli, str(root / "out")), nprocs=2, join=True)
    return root, [torch.load(root / "out" / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_follow_the_one_process_path_of_the_same_micro_batches(
    method: str, two_ranks, tmp_path: Path
) -> None:
    root, ranks = two_ranks
    job = job_for(tiny(method, tmp_path))
    assert job.key == job_for(tiny(method, root / "two")).key  # the process count is no axis
    train(job, Store(tmp_path))
    one = load_state(Store(tmp_path).final_path(job.key), torch.device("cpu"))
    two = load_state(Store(root / "two").final_path(job.key), torch.device("cpu"))  # written by rank 0
    assert [s for s, _, _ in two["curve"]] == [s for s, _, _ in one["curve"]] == list(range(1, 21))
    torch.testing.assert_close(torch.tensor([loss for _, loss, _ in two["curve"]]),
                               torch.tensor([loss for _, loss, _ in one["curve"]]), rtol=1e-5, atol=0)
    for part in ("net", "ema", "method"):
        for weights in (part_of(two, part), ranks[0][method][part], ranks[1][method][part]):
            assert_same_weights(weights, part_of(one, part))
    initial = build_trainee(job.config, job.method_name, job.method_train).net.state_dict()
    assert all(not torch.equal(initial[k], one["net"][k]) for k in initial)  # training moved every tensor


def part_of(state: dict, part: str) -> dict:
    """A saved state's weights of one part; for the EMA, its sigma_rel 0.1 profile (the one
    the ranks report)."""
    return state["ema"]["0.1"] if part == "ema" else state[part]


def test_two_processes_resume_from_rank_0_checkpoint_onto_the_uninterrupted_path(two_ranks) -> None:
    root, ranks = two_ranks
    job = job_for(tiny("meanflow", root / "resumed"))
    resumed = load_state(Store(root / "resumed").final_path(job.key), torch.device("cpu"))
    straight = load_state(Store(root / "two").final_path(job.key), torch.device("cpu"))
    assert resumed["curve"] == straight["curve"]
    for part in ("net", "ema", "method"):
        for weights in (part_of(resumed, part), ranks[1]["resumed"][part]):
            assert_same_weights(weights, part_of(straight, part))


def test_gradient_all_reduce_sums_and_leaves_a_gradient_no_rank_has_unset(two_ranks) -> None:
    _, ranks = two_ranks
    for r in range(2):
        assert ranks[r]["partial_grads"]["both"].tolist() == [3.0, 3.0, 3.0]  # 1 + 2
        assert ranks[r]["partial_grads"]["first"].tolist() == [1.0, 2.0, 3.0]  # rank 1 adds zeros
        assert ranks[r]["partial_grads"]["neither"] is True  # AdamW skips it, as in one process


def test_one_micro_batch_cannot_be_shared_by_two_processes(two_ranks) -> None:
    _, ranks = two_ranks
    for r in range(2):  # one clear line, on every rank, before any collective
        assert ranks[r]["indivisible"]["error"].startswith(
            "UserError: train.micro_batches=1 does not split over 2 processes; expected a multiple of 2")


def test_a_skipped_gradient_all_reduce_makes_the_ranks_diverge_and_is_caught(two_ranks) -> None:
    root, ranks = two_ranks
    for r in range(2):  # the engine's own replica check stops the run at its first checkpoint
        assert ranks[r]["no_all_reduce"]["error"].startswith(
            "ReplicasDiverged: the weights differ across the 2 processes at step 10")
    job = job_for(tiny("meanflow", root / "a"))
    assert not Store(root / "a").state_path(job.key).exists()  # nothing of it was saved
    # without that check the run "succeeds", and the weight comparison of the test above fails
    a, b = ranks[0]["no_all_reduce_unchecked"]["net"], ranks[1]["no_all_reduce_unchecked"]["net"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3
    with pytest.raises(AssertionError):
        assert_same_weights(a, b)


def test_micro_batches_are_a_training_axis_and_change_the_path(tmp_path: Path) -> None:
    one = job_for(tiny("fm", tmp_path, "train.micro_batches=1"))
    two = job_for(tiny("fm", tmp_path))
    assert one.key != two.key
    train(one, Store(tmp_path))
    train(two, Store(tmp_path))
    a = load_state(Store(tmp_path).final_path(one.key), torch.device("cpu"))["net"]
    b = load_state(Store(tmp_path).final_path(two.key), torch.device("cpu"))["net"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


def test_a_batch_that_does_not_split_into_the_micro_batches_is_refused_at_planning(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^train.batch_size=63 does not split into train.micro_batches=2 "
                                        r"equal micro-batches; expected a multiple of 2: set train.batch_size=62"):
        job_for(tiny("fm", tmp_path, "train.batch_size=63"))
    assert not (tmp_path / "runs").exists()


def test_under_torchrun_every_rank_trains_and_rank_0_alone_evaluates_and_reports(two_ranks) -> None:
    root, ranks = two_ranks
    assert [r["cli"]["code"] for r in ranks] == [0, 0]
    assert ranks[0]["cli"]["stdout"].count("| meanflow") == 1 and "done in" in ranks[0]["cli"]["stdout"]
    assert "| meanflow" not in ranks[1]["cli"]["stdout"] and "done in" not in ranks[1]["cli"]["stdout"]
    job = job_for(tiny("meanflow", root / "cli"))
    assert len(list(Store(root / "cli").root.glob(f"runs/{job.key}/evals/*.json"))) == 1
    final = load_state(Store(root / "cli").final_path(job.key), torch.device("cpu"))
    assert_same_weights(final["net"], ranks[1]["meanflow"]["net"])  # the path checked above


@pytest.mark.slow
def test_torchrun_trains_on_two_processes_and_only_rank_0_reports(tmp_path: Path) -> None:
    args = [*tiny("meanflow", tmp_path / "results"), "nfe=1", "eval.num_samples=200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "benchmark.run", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| meanflow") == 1 and done.stdout.count("done in") == 1
    store = Store(tmp_path / "results")
    job = job_for(args)
    assert len(list(store.root.glob(f"runs/{job.key}/evals/*.json"))) == 1
    train(job, Store(tmp_path / "one"))
    a = load_state(store.final_path(job.key), torch.device("cpu"))
    b = load_state(Store(tmp_path / "one").final_path(job.key), torch.device("cpu"))
    assert_same_weights(a["net"], b["net"])
