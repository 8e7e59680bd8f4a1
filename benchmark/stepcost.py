"""Step-cost benchmark: each method's training step time and peak memory as a ratio to the
baseline's (the method whose spec sets ``step_cost_baseline``), measured in one run on the
same backbone and batch.

    python -m benchmark.stepcost [--model dit-tiny] [--batch 128] [--steps 20] [--device cpu]
    python -m benchmark.stepcost --shape 4,32,32 --batch 32     # ImageNet-256 latent shape
    python -m benchmark.stepcost --precision bf16 --compile      # the GPU configuration

Beside each measured time the table gives the counted training FLOPs per step
(``benchmark.flops``) and their ratio to the baseline's, which is machine-independent;
``first step s`` is the warm-up step (with ``--compile``: the compilation time).

By default the step trains on the digits default (8x8, 16 patch tokens at patch 2).
``--shape C,H,W`` measures at another input shape instead, on random tensors of that
shape written as a ``data=latents`` shard in a temporary folder (a step's cost does not
depend on the values); 4,32,32 is the SD-VAE latent of a 256x256 image, where DiT-*/2
sees 256 patch tokens and iMF's 20 prefix tokens add 8% instead of 125%.

A step is the whole training step the engine runs (loss, backward, optimizer, EMA).  Each
method is measured in its own subprocess, so peak memory is its own: on CUDA the
allocator's peak; on the CPU the growth of the process's peak resident set over the
state after model construction and one warm-up step.  Methods are measured in rounds,
interleaved, and the median step time is reported, so a passing load spike on a shared
machine hits every method alike.

The rows come from the method registry: every method, then each method's
``step_cost_variants`` (overrides such as ``model.conditioning_mode=in_context``), as rows
named ``<method>+<value>``.  ``--methods`` picks rows; ``<method>+<key>=<value>`` measures a
method under any one override.  The baseline is always measured (first, if not asked for).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark.cli import entry
from benchmark.schema import UserError

VARIANT_SEP = "+"
"""``<method>+<value>`` is a row that measures a method under one override of its spec's
``step_cost_variants`` (the override whose value is ``<value>``), without a target: it shows
what that choice costs."""


def variant_rows(name: str) -> list[str]:
    """The extra rows a method's spec asks for: ``<name>+<value>`` per declared override."""
    from methods.specs import get_spec

    return [f"{name}{VARIANT_SEP}{o.partition('=')[2]}" for o in get_spec(name).step_cost_variants]


def default_rows() -> list[str]:
    """Every registered method (so a new method is measured without editing this file),
    then the variants their specs declare."""
    from methods.specs import METHOD_NAMES

    return [*METHOD_NAMES, *(row for name in METHOD_NAMES for row in variant_rows(name))]


def split_row(row: str) -> tuple[str, list[str]]:
    """``imf+in_context`` -> ("imf", ["model.conditioning_mode=in_context"]) from iMF's
    declared variants; ``scm+model.conditioning_mode=in_context`` -> that override as given.
    A KeyError names an unknown method or variant."""
    from methods.specs import get_spec

    name, _, variant = row.partition(VARIANT_SEP)
    declared = get_spec(name).step_cost_variants
    if not variant:
        return name, []
    if "=" in variant:
        return name, [variant]
    for override in declared:
        if override.partition("=")[2] == variant:
            return name, [override]
    shown = ", ".join(row for row in variant_rows(name)) or "none"
    raise KeyError(f"{name} declares no step-cost variant '{variant}'; expected one of: {shown} "
                   f"(or {name}+<key>=<value> for any override)")


def target(row: str) -> float | None:
    """The method's declared step-cost target (its spec); none for a variant row."""
    from methods.specs import get_spec

    name, extra = split_row(row)
    return None if extra else get_spec(name).step_cost_target


def measure(method: str, model: str, batch: int, steps: int, device: str, threads: int,
            data: list[str] | None = None, train: list[str] | None = None) -> dict:
    """Time ``steps`` training steps of ``method`` in this process (called in a subprocess)."""
    import torch

    from benchmark.config import compose_points
    from benchmark.flops import train_step_flops
    from benchmark.plan import plan_points
    from benchmark.train import build_trainee, train_step

    if threads:
        torch.set_num_threads(threads)
    name, extra = split_row(method)
    plan = plan_points(compose_points([f"method={name}", f"model={model}", f"train.batch_size={batch}",
                                       f"train.device={device}", *(data or []), *extra, *(train or [])]))
    job = plan.trainings[0]
    t = build_trainee(job.config, job.method_name, job.method_train)
    params = list(t.net.parameters()) + list(t.method.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    tc = job.config.train
    step = lambda i: train_step(t, opt, params, tc, 0, 2000 + i, range(1), tc.batch_size)  # noqa: E731
    tic = time.perf_counter()
    step(0)  # warm-up (allocations, lazy init, compilation)
    warmup = time.perf_counter() - tic
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
    return {"times": times, "peak_bytes": peak, "flops": train_step_flops(t, tc.batch_size), "warmup": warmup,
            "params": sum(p.numel() for p in t.net.parameters())}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one "error:" line and exit 2 (benchmark.cli), not usage + exit
        raise UserError(f"{message}; see python -m benchmark.stepcost --help")


def _count(lowest: int):
    """An argparse type: an integer >= ``lowest``, refused at parsing (before any worker starts)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lowest - 1
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {lowest}")
        return value

    parse.__name__ = f"integer >= {lowest}"
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m benchmark.stepcost", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="dit-tiny")
    parser.add_argument("--batch", type=_count(1), default=128)
    parser.add_argument("--steps", type=_count(1), default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=_count(1), default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=_count(0), default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--methods", default="", help="comma list of rows (default: every registered method, "
                        "then the variants their specs declare, e.g. imf+in_context; "
                        "<method>+<key>=<value> measures a method under any one override)")
    parser.add_argument("--shape", default="", help="C,H,W: measure on random inputs of this shape")
    parser.add_argument("--compile", action="store_true", help="train.compile=true (warm-up time = compile time)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="train.precision")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_data", default="", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:

    return entry(_main, argv, lambda: _parser().format_help())


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args._worker:
        data = json.loads(args._data) if args._data else None
        print(json.dumps(measure(args._worker, args.model, args.batch, args.steps, args.device,
                                 args.threads, data, train_overrides(args))))
        return 0
    shape = _parse_shape(args.shape) if args.shape else None
    with tempfile.TemporaryDirectory(prefix="stepcost-") as folder:
        return _run(args, _random_latents(shape, Path(folder)) if shape else [])


def train_overrides(args) -> list[str]:
    return [f"train.precision={args.precision}"] + (["train.compile=true"] if args.compile else [])


def _parse_shape(shape: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in shape.split(","))
    except ValueError:
        c = h = w = 0
    if min(c, h, w) < 1:
        raise UserError(f"--shape {shape!r} is not C,H,W; expected three positive integers, e.g. 4,32,32")
    return c, h, w


def _random_latents(shape: tuple[int, int, int], folder: Path) -> list[str]:
    """A ``data=latents`` shard of random inputs of ``shape`` (C,H,W); the overrides that use it."""
    import numpy as np

    c, h, w = shape
    rng = np.random.default_rng(0)
    np.savez(folder / "train-00000.npz", latents=rng.standard_normal((512, c, h, w), dtype=np.float32),
             labels=rng.integers(0, 10, 512))
    return ["data=latents", f"data.root={folder}", "eval.extractor=pixels"]  # no evaluation here


def _run(args, data: list[str]) -> int:
    from methods.specs import step_cost_baseline

    base = step_cost_baseline()
    methods = args.methods.split(",") if args.methods else default_rows()
    for row in methods:
        try:
            target(row)
        except KeyError as err:
            raise UserError(f"--methods {row}: {err.args[0]}") from None
    if base not in methods:  # every ratio divides by it
        methods = [base, *methods]
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, list[int]] = {m: [] for m in methods}
    flops: dict[str, int] = {}
    warmup: dict[str, float] = {}
    params = 0
    for _ in range(args.rounds):
        for m in methods:
            cmd = [sys.executable, "-m", "benchmark.stepcost", "--_worker", m, "--model", args.model,
                   "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
                   "--threads", str(args.threads), "--_data", json.dumps(data), "--precision", args.precision,
                   *(["--compile"] if args.compile else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:  # the worker's own one-line error (e.g. a shape the DiT cannot patch)
                lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
                raise UserError(f"measuring {m} failed: {lines[-1].removeprefix('error: ')}")
            out = json.loads(proc.stdout.splitlines()[-1])
            times[m] += out["times"]
            peaks[m].append(out["peak_bytes"])
            flops[m] = out["flops"]
            warmup[m] = max(warmup.get(m, 0.0), out["warmup"])
            params = out["params"] if m == base else params
    median = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    peak = {m: max(v) for m, v in peaks.items()}
    where = f"random {args.shape} inputs" if args.shape else "digits 1x8x8"
    print(f"step cost on {args.device}, {where}, model {args.model} ({params / 1e6:.2f}M params), batch {args.batch}, "
          f"{args.precision}{', compiled' if args.compile else ''}, {args.rounds} rounds x {args.steps} steps, medians; "
          f"ratios to {base}")
    print("| method | ms/step | time ratio | target | GFLOP/step | FLOP ratio | peak MiB | memory ratio | first step s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        ratio = median[m] / median[base]
        mem = peak[m] / peak[base] if peak[base] > 0 else float("nan")
        flop_ratio = flops[m] / flops[base]
        goal = target(m)
        verdict = "-" if goal is None else f"<= {goal}x " + ("ok" if ratio <= goal else "OVER")
        print(f"| {m} | {1000 * median[m]:.1f} | {ratio:.2f}x | {verdict} | {flops[m] / 1e9:.2f} | "
              f"{flop_ratio:.2f}x | {peak[m] / 2**20:.1f} | {mem:.2f}x | {warmup[m]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
