"""Evaluation: sample a trained run at one evaluation point, measure, and record.

The metric suite follows the dataset (``benchmark.catalog``): digits get Fréchet distance
and KID in a digits classifier's feature space (through torch-fidelity), the classifier's
accuracy on class-conditional samples and the test-vs-train floor; toy densities get the
sliced Wasserstein distance and MMD against fresh exact samples; datasets read from disk
get FD / KID (Inception FID by default) through torch-fidelity or clean-fid against cached
reference features (``benchmark.metrics.fid``), the record naming that reference.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from benchmark.catalog import dataset_info
from benchmark.data import Dataset
from benchmark.flops import evaluation_flops
from benchmark.plan import EvalJob, TrainingJob
from benchmark.progress import interactive
from benchmark.sample import Generated, balanced_labels, generate
from benchmark.schema import EvalConfig
from benchmark.store import Store, atomic_write_bytes
from benchmark.train import Trainee, evaluation_net


def _digits_metrics(gen: Generated, dataset: Dataset, cache_dir: Path, seed: int,
                    eval_cfg: EvalConfig | None = None) -> dict:
    from benchmark.metrics.digits import digits_report

    metrics, intervals = digits_report(gen.samples, gen.labels, cache_dir=cache_dir,
                                       draws=(eval_cfg or EvalConfig()).bootstrap)
    return {**metrics, "intervals": intervals}


def _toy_metrics(gen: Generated, dataset: Dataset, cache_dir: Path, seed: int,
                 eval_cfg: EvalConfig | None = None) -> dict:
    from benchmark.metrics.toy import evaluate_toy

    draws = min(30, (eval_cfg or EvalConfig()).bootstrap)  # each draw re-sorts 20k x 128 projections
    return evaluate_toy(gen.samples, dataset, num_reference=max(2000, gen.samples.shape[0]), seed=seed,
                        draws=draws)


def _fid_metrics(gen: Generated, dataset: Dataset, cache_dir: Path, seed: int,
                 eval_cfg: EvalConfig | None = None) -> dict:
    """FD / KID (Inception FID by default) through eval.backend; the returned ``reference``
    (what the samples were compared with) goes to the record, not to the metrics."""
    from benchmark.metrics.fid import FidOptions, evaluate_fid

    options = FidOptions.from_eval_config(eval_cfg or EvalConfig())
    # the feature extractors' own bars, under the same rule as the suite's (a terminal only)
    options = dataclasses.replace(options, progress=options.progress and interactive())
    return evaluate_fid(gen.samples, dataset, options=options, cache_dir=cache_dir)


METRIC_SUITES: dict[str, Callable[..., dict]] = {
    "digits": _digits_metrics,
    "toy": _toy_metrics,
    "fid": _fid_metrics,
}


def evaluate(job: TrainingJob, ev: EvalJob, trainee: Trainee, store: Store, final: dict) -> dict:
    """Run one evaluation point and write its record and sample grid (atomically)."""
    cfg, ds, ec = job.config, trainee.dataset, ev.eval
    net = evaluation_net(trainee, store, ev.train_key, ec.ema, final["step"])
    labels = balanced_labels(ec.num_samples, ds.num_classes)
    guidance = ev.identity["guidance"]
    gen = generate(trainee.method, net, shape=ds.shape, labels=labels, nfe=ev.nfe, guidance=guidance,
                   seed=ec.seed, batch_size=ec.batch_size, eval_params=ev.method_eval,
                   device=trainee.device, progress=ec.progress)
    tick = time.perf_counter()
    suite = METRIC_SUITES[dataset_info(cfg.data.name).metric]
    metrics = suite(gen, ds, store.cache_dir(), ec.seed, ec)
    metric_seconds = time.perf_counter() - tick
    reference = metrics.pop("reference", None)  # the fid suite names its real reference
    intervals = metrics.pop("intervals", {})
    atomic_write_bytes(store.grid_path(ev.train_key, ev.key),
                       sample_grid_png(gen.samples, gen.labels, ds, ec.grid_per_class))
    record = {
        "train_key": ev.train_key, "eval_key": ev.key, "method": job.method_name,
        "model": cfg.model.name, "data": cfg.data.name, "seed": cfg.seed,
        "nfe": ev.nfe, "nfe_counted": gen.nfe_counted, "nfe_declared": ev.nfe_counted,
        "guidance": ev.guidance, "ema": ec.ema, "method_train": job.method_train, "method_eval": ev.method_eval,
        "num_samples": ec.num_samples, "train_steps": cfg.train.steps,
        "sample_seconds": gen.seconds, "sec_per_sample": gen.seconds / ec.num_samples,
        "metric_seconds": metric_seconds, "train_seconds": final.get("seconds"),
        "metrics": metrics, "intervals": intervals, "checkpoint": ev.identity["checkpoint"], "identity": ev.identity,
        "provenance": provenance(trainee.device),
    }
    record["flops"] = evaluation_flops(trainee, ev.train_key, cfg.train, ev.nfe, guidance, ev.method_eval)
    if reference is not None:
        record["reference"] = reference
    store.write_eval(ev.train_key, ev.key, record, rung=ev.rung)
    return record


def sample_grid_png(samples: Tensor, labels: Tensor, dataset: Dataset, per_class: int) -> bytes:
    """Images: ``per_class`` rows, one column per class.  Toys: a scatter plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    if len(dataset.shape) == 3:
        grid = _image_grid(samples, labels, max(dataset.num_classes, 1), per_class)
        if grid.dim() == 3:  # RGB
            plt.imsave(buffer, grid.numpy(), format="png")
        else:
            plt.imsave(buffer, grid.numpy(), cmap="gray", vmin=0, vmax=1, format="png")
    else:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        pts = samples.reshape(samples.shape[0], -1).numpy()
        ys = pts[:, 1] if pts.shape[1] > 1 else torch.zeros(len(pts)).uniform_(-0.5, 0.5).numpy()
        ax.scatter(pts[:, 0], ys, s=2, alpha=0.5)
        ax.set_aspect("equal" if pts.shape[1] > 1 else "auto")
        fig.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(fig)
    return buffer.getvalue()


def _image_grid(samples: Tensor, labels: Tensor, num_classes: int, per_class: int) -> Tensor:
    """(rows * H, cols * W) in [0, 1], or (rows * H, cols * W, 3) for RGB samples; column k
    holds class k (the first channel only for other channel counts, e.g. latents)."""
    _, c, h, w = samples.shape
    rgb = c == 3
    grid = torch.ones(per_class * (h + 1), num_classes * (w + 1), *((3,) if rgb else ()))
    for k in range(num_classes):
        picks = samples[labels == k][:per_class] if num_classes > 1 else samples[:per_class]
        for row, img in enumerate(picks):
            tile = ((img.permute(1, 2, 0) if rgb else img[0]) + 1) / 2
            grid[row * (h + 1):row * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = tile.clamp(0, 1)
    return grid


def provenance(device: torch.device) -> dict:
    """Versions, git revision, device and date: enough to tell two results apart later."""
    import numpy

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"git": rev, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "device": f"{device.type}:{name}",
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
