"""The training engine: one loop for every method.

AdamW, linear warmup then constant or cosine learning rate, gradient clipping, and
power-function EMA profiles of the weights (``benchmark.ema``) with snapshots every
``steps / ema_snapshots`` steps, from which evaluation reconstructs the EMA of any relative
width (post-hoc EMA: the EMA length is an evaluation axis).  A method that trains against
a target network of its own (Shortcut's bootstrap teacher) declares its decay; the harness
keeps that teacher beside the net, separate from the evaluation EMA.  Every step is reseeded from (seed, micro-batch, step), and the latest state is
written atomically every ``ckpt_every`` steps, so a run stopped anywhere and started again
with the same command follows the uninterrupted run's path exactly.  A NaN or inf loss
stops the run with a message naming the step; nothing of a failed run is cached.

Data parallel (torchrun or a multi-task submitit job, ``benchmark.distributed``): the
global batch is ``train.micro_batches`` micro-batches, each seeded by its own index, and
the processes share them out (gradient accumulation within a process, a manual gradient
all-reduce across processes; no DDP wrapper, which the JVP methods would bypass).  The
trained weights therefore depend on the config alone, not on the number of processes.
Rank 0 alone writes checkpoints, the curve and ``final.pt``, and shows the progress bar.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import io
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmark import distributed
from benchmark.backbones import build_backbone
from benchmark.data import Dataset, load_dataset
from benchmark.ema import PowerEMA
from benchmark.flops import train_step_flops
from benchmark.plan import TrainingJob
from benchmark.schema import Failure, RunConfig, TrainConfig, UserError, method_config
from benchmark.store import Store, atomic_write_bytes
from methods import get_method, get_spec
from methods.base import Batch, Method
from methods.specs.base import teacher_decay_at


class TrainingDiverged(Failure):
    """The loss became NaN or inf; the message names the step."""


@dataclass
class Trainee:
    """Everything a training job builds: data, method, network, its EMA profiles and the
    method's teacher (None unless its spec declares a ``teacher_decay``)."""

    dataset: Dataset
    method: Method
    net: nn.Module
    ema: PowerEMA
    teacher: nn.Module | None
    teacher_decay: float | None
    device: torch.device
    teacher_rampup: float = 0.0  # cap on the teacher's half-life, a fraction of the steps done
    eval_nets: dict = field(default_factory=dict)  # reconstructed EMA nets, by (sigma_rel, step)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the loss)
    loss_fn: Callable | None = None  # the method's loss, compiled when train.compile is set

    def loss(self, batch: Batch, step: int, generator: torch.Generator) -> torch.Tensor:
        """The method's scalar training loss, under bf16 autocast when asked (a float32
        value either way)."""
        fn = self.loss_fn or self.method.loss
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss, _ = fn(self.net, batch, step=step, generator=generator, teacher=self.teacher)
        return loss.float()


# ----------------------------------------------------------------------------------------
# Construction


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; expected train.device=cpu or auto")
    device = torch.device(name)
    if device.type == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_device_index())  # one GPU per rank
    return device


def build_trainee(cfg: RunConfig, method_name: str, method_train: dict) -> Trainee:
    """Dataset, method (with its training fields), backbone, EMA profiles and teacher, on
    the device."""
    device = resolve_device(cfg.train.device)
    dataset = load_dataset(cfg.data.name, **cfg.data.options)
    spec = get_spec(method_name)
    mcfg = method_config(spec, {**cfg.method, **method_train})
    method = get_method(method_name)(mcfg, dataset.num_classes).to(device)
    torch.manual_seed(cfg.seed)  # initial weights depend on the seed only
    net = build_backbone(cfg.model, shape=dataset.shape, num_classes=dataset.num_classes,
                         slots=method.conditioning, options=method.backbone_options()).to(device)
    ema = PowerEMA(net, cfg.train.ema_profiles)
    decay = spec.teacher_decay(mcfg)
    teacher = copy.deepcopy(net).requires_grad_(False) if decay is not None else None
    loss_fn = torch.compile(method.loss) if cfg.train.compile else None
    return Trainee(dataset, method, net, ema, teacher, decay, device, spec.teacher_rampup(mcfg),
                   precision=cfg.train.precision, loss_fn=loss_fn)


def step_seed(seed: int, micro_batch: int, step: int) -> int:
    """A 63-bit seed for one micro-batch of one training step, independent of anything but
    its arguments (micro-batch 0 of a one-micro-batch run is the historical rank 0)."""
    digest = hashlib.sha256(f"train/{seed}/{micro_batch}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def micro_batch_split(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(examples per micro-batch, micro-batches per process) for ``world_size`` processes;
    a batch or micro-batch count that does not divide evenly is a UserError."""
    n = train.micro_batches
    if train.batch_size % n:
        raise UserError(f"train.batch_size={train.batch_size} does not split into train.micro_batches={n} "
                        f"equal micro-batches; expected a multiple of {n}: set train.batch_size="
                        f"{max(n, train.batch_size - train.batch_size % n)} or another train.micro_batches")
    if n % world_size:
        raise UserError(f"train.micro_batches={n} does not split over {world_size} processes; expected "
                        f"a multiple of {world_size}: set train.micro_batches={world_size * -(-n // world_size)} "
                        f"(a different micro-batch count is a different run) or a process count that divides {n}")
    return train.batch_size // n, n // world_size


def learning_rate(train: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr``, then constant or cosine decay to 0 at ``steps``."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def draw_batch(dataset: Dataset, batch_size: int, generator: torch.Generator, device) -> Batch:
    """``batch_size`` training examples drawn uniformly with replacement."""
    idx = torch.randint(dataset.train_x.shape[0], (batch_size,), generator=generator)
    return Batch(dataset.train_x[idx].to(device), dataset.train_y[idx].to(device))


# ----------------------------------------------------------------------------------------
# Checkpoints


def save_state(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path, device: torch.device) -> dict:
    """Tensors and plain containers only (``weights_only=True``); a corrupt file is a clear error."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} is unreadable ({type(err).__name__}); expected a "
                        f"state written by this suite: delete it to restart the run from step 0 "
                        f"(or rerun with --force-train)") from None


# ----------------------------------------------------------------------------------------
# The loop


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on a run folder: a second process training the same key (a rerun
    while an orphaned job still runs, a requeued SLURM job) waits instead of racing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process training {run_dir.name}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class PreemptionAtStepEnd:
    """Defer SLURM's preemption / time-limit warning to the end of the training step.

    submitit handles SIGUSR2 (``sbatch --signal=USR2@...``) by checkpointing the task and
    requeueing the job, at whatever bytecode the signal lands on.  Inside this context the
    signal is only recorded; the loop finishes its step, saves the exact state and then
    hands the signal to submitit (``deliver``), so a requeued run resumes from the step it
    stopped at, not from the last periodic checkpoint.  Outside submitit (no Python
    handler installed) and off the main thread it does nothing."""

    def __init__(self) -> None:
        self.caught: list[tuple[int, object]] = []
        self.previous = None

    def __enter__(self) -> PreemptionAtStepEnd:
        if (hasattr(signal, "SIGUSR2") and threading.current_thread() is threading.main_thread()
                and callable(signal.getsignal(signal.SIGUSR2))):
            self.previous = signal.signal(signal.SIGUSR2, lambda signum, frame: self.caught.append((signum, frame)))
        return self

    def pending(self) -> bool:
        return bool(self.caught)

    def deliver(self) -> None:
        """Restore the handler and call it with the recorded signal (submitit exits here)."""
        if self.previous is None:
            return
        handler, self.previous = self.previous, None
        signal.signal(signal.SIGUSR2, handler)
        if self.caught:
            signum, frame = self.caught[0]
            self.caught.clear()
            handler(signum, frame)

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.deliver()  # a warning in the last step still reaches submitit
        elif self.previous is not None:
            signal.signal(signal.SIGUSR2, self.previous)


def train(job: TrainingJob, store: Store, *, stop_after: int | None = None) -> Trainee | None:
    """Train ``job`` to ``train.steps`` (or stop after step ``stop_after``: tests, and the
    intermediate evaluations of a tuning trial), resuming from the run folder's latest
    state.  Writes ``final.pt`` when done.  Returns this process's trained networks, or
    None when the run was already trained.

    Under torchrun every process calls this for the same jobs in the same order; rank 0
    holds the run lock and decides (for all) whether the run is already trained."""
    rank, world, _ = distributed.init_from_env()
    micro_batch_split(job.config.train, world)  # a bad split fails on every rank, before any collective
    lock = run_lock(store.run_dir(job.key)) if rank == 0 else contextlib.nullcontext()
    with lock:
        distributed.check_same(job.key, "the run being trained")
        if not distributed.from_main(store.is_trained(job.key) if rank == 0 else 0):
            return _train_locked(job, store, stop_after, rank, world)
    return None


def _train_locked(job: TrainingJob, store: Store, stop_after: int | None, rank: int, world: int) -> Trainee:
    cfg, tc = job.config, job.config.train
    size, per_rank = micro_batch_split(tc, world)
    micro = range(rank * per_rank, (rank + 1) * per_rank)  # this process's micro-batch indices
    if tc.threads:
        torch.set_num_threads(tc.threads)
    t = build_trainee(cfg, job.method_name, job.method_train)
    params = list(t.net.parameters()) + list(t.method.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    start, curve, seconds, window = 0, [], 0.0, []
    state_path = store.state_path(job.key)
    if distributed.from_main(state_path.is_file() if rank == 0 else 0):  # all ranks load rank 0's state
        state = load_state(state_path, t.device)
        load_weights(t, state)
        opt.load_state_dict(state["opt"])
        start, curve, seconds = state["step"], state["curve"], state["seconds"]
        window = state["window"]  # losses since the last curve point
        if rank == 0:
            print(f"resuming {job.key} from step {start}", file=sys.stderr, flush=True)
    distributed.check_same(start, "the step to resume from")
    if stop_after is not None and start >= stop_after:
        return t  # already there (or past it): nothing to train

    bar = _progress(tc, start, f"train {job.method_name} {job.key}", show=rank == 0)
    tick = time.perf_counter()
    with PreemptionAtStepEnd() as preemption:
        for step in range(start, tc.steps):
            loss = train_step(t, opt, params, tc, cfg.seed, step, micro, size)
            window.append(loss)
            bar.update(1)
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                curve.append([step + 1, sum(window) / len(window), learning_rate(tc, step)])
                bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
                window = []
            done = step + 1 == tc.steps or step + 1 == stop_after
            preempted = distributed.all_reduce_mean(float(preemption.pending())) > 0  # any rank warned
            if rank == 0 and ((step + 1) % snapshot_every(tc) == 0 or step + 1 == tc.steps):
                # before the state: a state saved past a snapshot step implies the snapshot exists
                save_state(store.ema_snapshot_path(job.key, step + 1),
                           {"step": step + 1, "profiles": t.ema.state_dict()})
            if (step + 1) % tc.ckpt_every == 0 or done or preempted:
                now = time.perf_counter()
                seconds, tick = seconds + now - tick, now
                distributed.check_replicas(params, step + 1)  # a skipped all-reduce is caught, not saved
                if rank == 0:
                    save_state(state_path, {**weights_state(t), "opt": opt.state_dict(),
                                            "step": step + 1, "curve": curve, "seconds": seconds,
                                            "window": window})
            if preempted and not done:
                if rank == 0:
                    print(f"saved {job.key} at step {step + 1} on the preemption warning", file=sys.stderr,
                          flush=True)
                bar.close()
                preemption.deliver()  # submitit: requeue this job, exit; it resumes from step + 1
                return t  # a rank that submitit does not exit stops here too
            if step + 1 == stop_after:
                break
    bar.close()
    if rank == 0 and (start >= tc.steps or (stop_after is None or stop_after >= tc.steps)):
        _write_final(store, job, t, curve, seconds)
    return t


def train_step(t: Trainee, opt, params, tc: TrainConfig, seed: int, step: int,
                micro: range, size: int) -> float:
    """One optimizer step over this process's micro-batches ``micro`` (``size`` examples
    each); returns the global batch's mean loss (the same on every rank)."""
    opt.zero_grad(set_to_none=True)
    t.net.train()
    total, local = tc.micro_batches, 0.0
    for m in micro:
        loss = _micro_batch_loss(t, seed, m, step, size)
        local += loss.item()
        # each micro-batch weighs 1/total, so the (all-reduced) sum is the global mean gradient
        (loss / total if total > 1 else loss).backward()
    value = distributed.all_reduce_mean(local / len(micro))  # every rank gets the same value
    if not math.isfinite(value):
        raise TrainingDiverged(f"training loss is {value} at step {step}; lower train.lr, keep "
                               f"train.grad_clip > 0, or check the method's settings")
    distributed.all_reduce_grads(params)
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
    for group in opt.param_groups:
        group["lr"] = learning_rate(tc, step)
    opt.step()
    t.ema.update(t.net, step + 1)
    if t.teacher is not None:
        with torch.no_grad():
            decay = teacher_decay_at(t.teacher_decay, t.teacher_rampup, step + 1)
            torch._foreach_lerp_(list(t.teacher.parameters()), list(t.net.parameters()), 1 - decay)
    return value


def _micro_batch_loss(t: Trainee, seed: int, m: int, step: int, size: int) -> torch.Tensor:
    """The method's scalar loss on micro-batch ``m`` of ``step``: data indices and the
    method's randomness are both seeded from (seed, m, step) alone."""
    s = step_seed(seed, m, step)
    data_gen = torch.Generator().manual_seed(s)
    method_gen = torch.Generator(device=t.device).manual_seed(s ^ 0x5DEECE66D)
    return t.loss(draw_batch(t.dataset, size, data_gen, t.device), step, method_gen)


def _progress(tc: TrainConfig, start: int, desc: str, show: bool = True):
    from tqdm.auto import tqdm

    from benchmark.progress import interactive  # a terminal only: not in job logs, pipes, tests

    return tqdm(total=tc.steps, initial=start, desc=desc, disable=not (tc.progress and show and interactive()),
                leave=False, dynamic_ncols=True, mininterval=1.0)


def _write_final(store: Store, job: TrainingJob, t: Trainee, curve: list, seconds: float) -> None:
    if store.is_trained(job.key):
        return
    lines = ["step,loss,lr"] + [f"{s},{loss:.6g},{lr:.6g}" for s, loss, lr in curve]
    atomic_write_bytes(store.run_dir(job.key) / "curve.csv", ("\n".join(lines) + "\n").encode())
    per_step = train_step_flops(t, job.config.train.batch_size)
    flops = {"train_per_step": per_step, "train_total": per_step * job.config.train.steps}
    store.write_final_summary(job.key, {"curve": curve, "seconds": seconds, "steps": job.config.train.steps,
                                        "flops": flops, "end_time": time.time()})  # MLflow's real end time
    save_state(store.final_path(job.key), {**weights_state(t), "step": job.config.train.steps,
                                           "seconds": seconds, "curve": curve})


def snapshot_every(tc: TrainConfig) -> int:
    """Steps between EMA snapshots: ``ema_snapshots`` evenly over the run (the last one at
    the final step)."""
    return max(1, math.ceil(tc.steps / tc.ema_snapshots))


def weights_state(t: Trainee) -> dict:
    """Everything trained: network, EMA profiles, method parameters, teacher."""
    state = {"net": t.net.state_dict(), "ema": t.ema.state_dict(), "method": t.method.state_dict()}
    if t.teacher is not None:
        state["teacher"] = t.teacher.state_dict()
    return state


def load_weights(t: Trainee, state: dict) -> None:
    """Network, EMA profiles, method state and teacher from a checkpoint (``state.pt`` or
    ``final.pt``)."""
    t.net.load_state_dict(state["net"])
    t.ema.load_state_dict(state["ema"])
    t.method.load_state_dict(state["method"])
    if t.teacher is not None:
        t.teacher.load_state_dict(state["teacher"])


def load_checkpoint(job: TrainingJob, store: Store, step: int) -> tuple[Trainee, dict] | None:
    """The run's networks at ``step`` from its latest state, or None when that state is at
    another step (a tuning trial evaluates an intermediate checkpoint right after it)."""
    path = store.state_path(job.key)
    if not path.is_file():
        return None
    t = build_trainee(job.config, job.method_name, job.method_train)
    state = load_state(path, t.device)
    if state["step"] != step:
        return None
    load_weights(t, state)
    return t, state


def load_trained(job: TrainingJob, store: Store) -> tuple[Trainee, dict]:
    """The finished run's networks (weights from ``final.pt``) and its final state."""
    t = build_trainee(job.config, job.method_name, job.method_train)
    final = load_state(store.final_path(job.key), t.device)
    load_weights(t, final)
    return t, final


def evaluation_net(t: Trainee, store: Store, train_key: str, ema: str | float, step: int) -> nn.Module:
    """The weights an evaluation samples from: the trained net (``ema="raw"``) or the
    post-hoc EMA of relative width ``ema`` at ``step``, reconstructed by least squares from
    the run's snapshots up to ``step`` and the profiles tracked at ``step`` (those held by
    ``t.ema``, loaded from the checkpoint of that step).  Cached on the trainee."""
    if ema == "raw":
        return t.net
    if (ema, step) in t.eval_nets:
        return t.eval_nets[(ema, step)]
    from benchmark.ema import combine, profile_key, reconstruction_coefficients

    sources = [(sigma, step, None) for sigma in t.ema.sigma_rels]  # live profiles at `step`
    for path in store.ema_snapshot_paths(train_key):
        at = int(path.stem.split("-")[1])
        if at < step:
            sources += [(sigma, at, path) for sigma in t.ema.sigma_rels]
    coefficients = reconstruction_coefficients([(s, at) for s, at, _ in sources], float(ema), step)
    states, weights, loaded = [], [], {}
    for (sigma, _at, path), c in zip(sources, coefficients):
        if c == 0:
            continue
        if path is None:
            profiles = t.ema.profiles
        else:
            if path not in loaded:
                loaded[path] = load_state(path, t.device)["profiles"]
            profiles = loaded[path]
        states.append(profiles[profile_key(sigma)])
        weights.append(c)
    net = copy.deepcopy(t.net)
    net.load_state_dict(combine(states, weights))
    t.eval_nets[(ema, step)] = net
    return net
