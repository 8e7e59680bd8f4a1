"""Step-cost benchmark: each method's training step time and peak memory as a ratio to
Flow Matching's, measured in one run on the same backbone and batch.

    python -m benchmark.stepcost [--model dit-tiny] [--batch 128] [--steps 20] [--device cpu]

A step is the whole training step the engine runs (loss, backward, optimizer, EMA).  Each
method is measured in its own subprocess, so peak memory is its own: on CUDA the
allocator's peak; on the CPU the growth of the process's peak resident set over the
state after model construction and one warm-up step.  Methods are measured in rounds,
interleaved, and the median step time is reported, so a passing load spike on a shared
machine hits every method alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TARGETS = {"fm": 1.0, "shortcut": 1.3, "meanflow": 1.6, "scm": 1.6, "imf": 2.2, "imf-adaln": 2.2}
VARIANTS = {"imf-adaln": ("imf", ["method.conditioning_mode=adaln"])}
"""Rows that are a method with overrides: iMF's default in-context prefix tokens (36 tokens
on 8x8 digits against FM's 16) change the architecture; ``imf-adaln`` is iMF on exactly
Flow Matching's adaLN backbone."""


def measure(method: str, model: str, batch: int, steps: int, device: str, threads: int) -> dict:
    """Time ``steps`` training steps of ``method`` in this process (called in a subprocess)."""
    import torch

    from benchmark.config import compose_points
    from benchmark.plan import plan_points
    from benchmark.train import _train_step, build_trainee

    if threads:
        torch.set_num_threads(threads)
    name, extra = VARIANTS.get(method, (method, []))
    plan = plan_points(compose_points([f"method={name}", f"model={model}", f"train.batch_size={batch}",
                                       f"train.device={device}", *extra]))
    job = plan.trainings[0]
    t = build_trainee(job.config, job.method_name, job.method_train)
    params = list(t.net.parameters()) + list(t.method.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    tc = job.config.train
    step = lambda i: _train_step(t, opt, params, tc, 0, 2000 + i, range(1), tc.batch_size)  # noqa: E731
    step(0)  # warm-up (allocations, lazy init)
    cuda = t.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps):
        tic = time.perf_counter()
        step(i + 1)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    return {"times": times, "peak_bytes": peak,
            "params": sum(p.numel() for p in t.net.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dit-tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--methods", default=",".join(TARGETS))
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        print(json.dumps(measure(args._worker, args.model, args.batch, args.steps, args.device, args.threads)))
        return 0
    methods = args.methods.split(",")
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, list[int]] = {m: [] for m in methods}
    params = 0
    for _ in range(args.rounds):
        for m in methods:
            cmd = [sys.executable, "-m", "benchmark.stepcost", "--_worker", m, "--model", args.model,
                   "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
                   "--threads", str(args.threads)]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            times[m] += out["times"]
            peaks[m].append(out["peak_bytes"])
            params = out["params"] if m == "fm" else params
    median = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    peak = {m: max(v) for m, v in peaks.items()}
    print(f"step cost on {args.device}, model {args.model} ({params / 1e6:.2f}M params), batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    print("| method | ms/step | time ratio | target | peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        ratio = median[m] / median["fm"] if "fm" in median else float("nan")
        mem = peak[m] / peak["fm"] if "fm" in peak and peak["fm"] > 0 else float("nan")
        verdict = "ok" if ratio <= TARGETS.get(m, float("inf")) else "OVER"
        print(f"| {m} | {1000 * median[m]:.1f} | {ratio:.2f}x | <= {TARGETS.get(m, '-')}x {verdict} | "
              f"{peak[m] / 2**20:.1f} | {mem:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
