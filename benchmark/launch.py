"""Launchers: run training and evaluation tasks in this process, as local processes, or
on SLURM, all through one interface (submitit for the last two).

A sweep runs in two phases: every missing training, then one evaluation task per trained
run for its missing points, so an evaluation never starts before its checkpoint exists.
Tasks write only their own results (atomically) and never talk to MLflow: the driver
mirrors the records afterwards, so parallel jobs cannot race on the tracking store.  Both
tasks are ``Checkpointable``: on a time limit or preemption SLURM requeues them; a training
resumes from the run's latest state, an evaluation skips the points it already recorded
(each record is written atomically, so an interrupted point is computed again).  Every
cached unit has a lock: a training its run folder's, an evaluation point its own
(``Store.eval_lock``), each taken before computing and followed by a second look at the
cache, so concurrent identical sweeps compute each unit once and the others reuse it.  A
failed or cancelled task caches nothing; with every launcher, inline included, the others
go on, the command lists the failures, exits 1, and a rerun retries only them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.plan import EvalJob, TrainingJob
from benchmark.schema import LauncherConfig, UserError
from benchmark.store import Store

try:  # submitit is a dependency; the import is here so Checkpointable can be the base
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object  # type: ignore[misc,assignment]


# ----------------------------------------------------------------------------------------
# Tasks (picklable callables run wherever the launcher puts them)


def set_threads(threads: int) -> None:
    """torch CPU threads of a task (0: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


class TrainTask(Checkpointable):
    """Train one run to its final checkpoint (resuming from its latest state)."""

    def __init__(self, job: TrainingJob, results_dir: str, threads: int = 0) -> None:
        self.job, self.results_dir, self.threads = job, results_dir, threads

    def __call__(self) -> str:
        from benchmark.train import train

        set_threads(self.threads)
        trained = train(self.job, Store(self.results_dir)) is not None
        # one line per unit computed or reused: the logs tell how often each was computed
        print(f"{'trained' if trained else 'reused'} training {self.job.key}", flush=True)
        return self.job.key


class EvaluationsFailed(RuntimeError):
    """Some points of an evaluation task failed (the others were recorded)."""


@dataclass
class EvalTask(Checkpointable):
    """Evaluate one trained run at its missing evaluation points (requeued as it is on a
    time-limit warning: the points recorded by then are cached and skipped)."""

    job: TrainingJob
    evals: list[EvalJob]
    results_dir: str
    threads: int = 0

    def __call__(self) -> list[str]:
        """Each point under its lock, the cache looked at again once the lock is held; a
        point that fails does not stop the others (raises at the end, naming them)."""
        from benchmark.evaluate import evaluate
        from benchmark.progress import progress_bar, say
        from benchmark.train import load_trained

        set_threads(self.threads)
        store, loaded, failed = Store(self.results_dir), None, []
        points = progress_bar(len(self.evals), f"evaluate {self.job.key}", self.job.config.eval.progress,
                              unit="point", iterable=self.evals)
        for ev in points:
            if store.has_eval(ev.train_key, ev.key):
                continue
            with store.eval_lock(ev.train_key, ev.key):
                if store.has_eval(ev.train_key, ev.key):
                    say(f"reused evaluation {ev.key} (computed by another process)")
                    continue
                loaded = loaded or load_trained(self.job, store)
                try:
                    evaluate(self.job, ev, loaded[0], store, loaded[1])
                except (UserError, OSError):
                    raise  # the user's mistake or the filesystem's: the same for every point
                except Exception as err:  # noqa: BLE001 - this point's failure, not the others'
                    failed.append(f"{ev.key}: {type(err).__name__}: {err}"[:300])
                    continue
            say(f"evaluated {ev.key} nfe={ev.nfe} guidance={ev.guidance:g}")
        points.close()
        if failed:
            raise EvaluationsFailed(f"{len(failed)} of {len(self.evals)} point(s) failed: " + "; ".join(failed))
        return [ev.key for ev in self.evals]


@dataclass
class Outcome:
    name: str
    ok: bool
    error: str = ""
    result: Any = None


# ----------------------------------------------------------------------------------------
# Launchers


def _executor(cfg: LauncherConfig, folder: Path):
    import submitit

    if cfg.name == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        # explicit timeout: the local executor's default kills a job after 2 minutes
        executor.update_parameters(timeout_min=cfg.timeout_min, gpus_per_node=cfg.gpus_per_node)
        return executor
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=cfg.max_requeues)
    params: dict[str, Any] = {"time": cfg.timeout_min, "cpus_per_task": cfg.cpus_per_task,
                              "array_parallelism": cfg.max_parallel, "signal_delay_s": 30}
    if cfg.partition:
        params["partition"] = cfg.partition
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem"] = f"{cfg.mem_gb}GB"
    if cfg.additional:
        params["additional_parameters"] = dict(cfg.additional)
    executor.update_parameters(**params)
    return executor


class Pool:
    """Tasks through one launcher, at most ``limit`` running at once.  ``submit`` returns at
    once (inline runs the task there and then, recording a failure instead of raising it,
    except the exception types in ``fatal``, which end the command as they would without a
    launcher); ``wait`` blocks until something finished and returns those outcomes."""

    def __init__(self, cfg: LauncherConfig, folder: Path, limit: int | None = None,
                 fatal: tuple[type[BaseException], ...] = ()) -> None:
        self.cfg, self.folder, self.fatal = cfg, folder, fatal
        self.limit = 1 if cfg.name == "inline" else (limit or cfg.max_parallel)
        self.executor = _executor(cfg, folder) if cfg.name != "inline" else None
        self.running: list[tuple[str, Any]] = []
        self._finished: list[Outcome] = []

    def free(self) -> int:
        """Room for more tasks (an inline outcome not yet collected by ``wait`` takes its slot)."""
        return self.limit - len(self.running) - len(self._finished)

    def busy(self) -> bool:
        """Tasks running, or finished with outcomes not yet collected by ``wait``."""
        return bool(self.running or self._finished)

    def states(self) -> list[str]:
        """The submitit state of each running job (SLURM's through submitit's rate-limited
        watcher; a local job's from its process)."""
        return [str(job.state) for _, job in self.running]

    def submit(self, batch: list[tuple[str, Callable]]) -> None:
        if self.executor is None:
            for name, task in batch:
                print(f"  running {name}", flush=True)
                try:
                    self._finished.append(Outcome(name, True, result=task()))
                except self.fatal:
                    raise
                except Exception as err:  # noqa: BLE001 - a task's failure is its outcome
                    self._finished.append(Outcome(name, False, f"{type(err).__name__}: {err}"[:300]))
            return
        submitted = _submit(self.executor, batch, self.cfg)
        for name, job in submitted:
            print(f"  submitted {name} as job {job.job_id}", flush=True)
        self.running += submitted

    def wait(self, poll_s: float = 1.0, on_poll: Callable[[], None] | None = None) -> list[Outcome]:
        """``on_poll``: called at each look at the jobs that finds none finished."""
        while True:
            finished, self._finished = self._finished, []
            still = []
            for name, job in self.running:
                if job.done():
                    finished.append(_outcome(name, job))
                else:
                    still.append((name, job))
            self.running = still
            if finished or not self.running:
                return finished
            if on_poll is not None:
                on_poll()
            time.sleep(poll_s)


FATAL_INLINE = (UserError, OSError)
"""Exceptions an inline task lets through: a user mistake (exit 2) and a filesystem failure
(one line, exit 1) would fail every other task the same way."""


def run_tasks(tasks: list[tuple[str, Callable]], cfg: LauncherConfig, folder: Path) -> list[Outcome]:
    """Run every task and return every outcome: inline one after another; local jobs kept to
    ``max_parallel`` at once; SLURM jobs in one array (the scheduler enforces the parallelism)."""
    pool = Pool(cfg, folder, limit=cfg.max_parallel if cfg.name == "local" else len(tasks), fatal=FATAL_INLINE)
    pending = list(tasks)
    outcomes: dict[str, Outcome] = {}
    if cfg.name != "inline":
        print(f"launcher={cfg.name}: {len(tasks)} job(s), logs in {folder}", flush=True)
    status, start = StatusLine() if cfg.name != "inline" else None, time.monotonic()

    def show(final: bool = False) -> None:
        if status is not None:
            line = format_status(cfg.name, pool.states(), time.monotonic() - start, waiting=len(pending),
                                 finished=[o.ok for o in outcomes.values()])
            if final:
                status.close(line)
            else:
                status.show(line)

    while pending or pool.busy():
        if pending and pool.free() > 0:
            n = pool.free()
            if status is not None:
                status.clear()  # the submission lines go above the status line
            pool.submit(pending[:n])
            pending = pending[n:]
            continue
        show()
        for outcome in pool.wait(on_poll=show):
            outcomes[outcome.name] = outcome
    show(final=True)
    return [outcomes[name] for name, _ in tasks]


# ----------------------------------------------------------------------------------------
# The live status line (launcher=local and slurm)

PHASES = ("pending", "running", "done", "failed")
JOB_PHASES = {
    **dict.fromkeys(("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"),
                    "running"),
    **dict.fromkeys(("COMPLETED", "FINISHED", "DONE"), "done"),
    **dict.fromkeys(("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                     "INTERRUPTED", "REVOKED"), "failed"),
}
"""SLURM's job states and submitit's local ones by phase; any other (PENDING, REQUEUED,
PREEMPTED before its requeue, UNKNOWN before the first sacct) is pending."""


def job_phase(state: str) -> str:
    """pending, running, done or failed for a submitit job state (``CANCELLED by 1000`` too)."""
    words = state.split()
    return JOB_PHASES.get(words[0].upper() if words else "", "pending")


def format_status(launcher: str, states: list[str], elapsed_s: float, waiting: int = 0,
                  finished: list[bool] = ()) -> str:
    """One line: how many jobs are pending (``waiting`` not yet submitted, plus those the
    scheduler holds), running, done and failed, of how many, and the time since the launch.
    ``states``: the submitit states of the submitted jobs whose outcome is not collected
    yet; ``finished``: whether each collected job succeeded."""
    counts = Counter(job_phase(s) for s in states)
    counts["pending"] += waiting
    counts.update("done" if ok else "failed" for ok in finished)
    minutes, seconds = divmod(int(elapsed_s), 60)
    hours, minutes = divmod(minutes, 60)
    total = len(states) + waiting + len(finished)
    return (f"launcher={launcher}: " + ", ".join(f"{counts[p]} {p}" for p in PHASES)
            + f" of {total} job(s); {hours}:{minutes:02d}:{seconds:02d} elapsed")


class StatusLine:
    """The status of the running jobs on stdout: on a terminal one line rewritten in place;
    otherwise (a log, a pipe) a plain line when it changed, at most every ``every_s``
    seconds; the last status always stays as a plain line (``close``)."""

    def __init__(self, every_s: float = 60.0, tty: bool | None = None) -> None:
        from benchmark.progress import interactive

        self.every_s, self.tty = every_s, interactive() if tty is None else tty
        self.drawn = ""  # the text on the terminal's current line (tty)
        self.printed, self.printed_at = "", float("-inf")

    def show(self, line: str) -> None:
        if self.tty:
            if line != self.drawn:
                sys.stdout.write("\r" + line + "\x1b[K")
                sys.stdout.flush()
                self.drawn = line
        elif line != self.printed and time.monotonic() - self.printed_at >= self.every_s:
            self._print(line)

    def clear(self) -> None:
        """Wipe the line on a terminal before something else is printed there."""
        if self.tty and self.drawn:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self.drawn = ""

    def close(self, line: str) -> None:
        self.clear()
        if line != self.printed:
            self._print(line)

    def _print(self, line: str) -> None:
        print(line, flush=True)
        self.printed, self.printed_at = line, time.monotonic()


def _submit(executor, batch: list[tuple[str, Callable]], cfg: LauncherConfig) -> list[tuple[str, Any]]:
    """Submit ``batch`` at once (one SLURM array).  sbatch refusing it (an unknown partition
    or account, GPUs the cluster lacks, no SLURM here) is a user mistake: one line."""
    # submitit also prints sbatch's stderr when it fails: the one line below says it instead
    quiet = contextlib.redirect_stderr(io.StringIO()) if cfg.name == "slurm" else contextlib.nullcontext()
    try:
        with quiet, executor.batch():
            return [(name, executor.submit(task)) for name, task in batch]
    except Exception as err:  # submitit's FailedJobError carries sbatch's stderr; OSError: no sbatch
        if cfg.name != "slurm":
            raise
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        said = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else type(err).__name__)
        raise UserError(f"sbatch refused the jobs: {said[:300]}; expected launcher settings this cluster "
                        f"accepts: check launcher.partition, launcher.gpus_per_node, launcher.mem_gb, "
                        f"launcher.additional and that SLURM_CONF names the cluster") from None


def _outcome(name: str, job) -> Outcome:
    try:
        return Outcome(name, True, result=job.result())
    except Exception as err:  # FailedJobError (raised inside), UncompletedJobError (cancelled, killed)
        job.done(force_check=True)  # the cached state can be a minute old (e.g. RUNNING)
        state = getattr(job, "state", "?")
        return Outcome(name, False, f"job {job.job_id} ({state}): {_reason(err)}; log: {job.paths.stderr}")


def _reason(err: Exception) -> str:
    """One line that says why a job failed.  A FailedJobError quotes the task's traceback
    between two rules and then lists log paths: take the traceback's last line (the
    exception).  An UncompletedJobError means the job ended without a result."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    # FailedJobError (the task raised) subclasses UncompletedJobError: test it first
    if isinstance(err, UncompletedJobError) and not isinstance(err, FailedJobError):
        return "ended without a result (cancelled, killed, or out of time and not requeued)"
    text, rule = str(err), "-" * 22
    if text.count(rule) >= 2:
        text = text.split(rule)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(err).__name__


# ----------------------------------------------------------------------------------------
# The two phases


def job_threads(cfg: LauncherConfig) -> int:
    if cfg.threads or cfg.name != "local":
        return cfg.threads
    return max(1, (os.cpu_count() or 1) // cfg.max_parallel)


def check_embedded_data(trainings: list[TrainingJob]) -> None:
    """Before any run folder exists: each dataset the sweep generates or ships (digits, the
    toys; not those read from data.root, whose files the planner checks) is built once
    with its ``data.options``, so a value its loader refuses (``data.options.std=-1``) is one
    UserError now, not a failed training.  Each costs well under a second."""
    from benchmark.catalog import DATA_LAYOUTS
    from benchmark.data import load_dataset
    from benchmark.keys import canonical_json

    seen = set()
    for job in trainings:
        data = job.config.data
        key = canonical_json({"name": data.name, "options": data.options})
        if data.name in DATA_LAYOUTS or key in seen:
            continue
        seen.add(key)
        load_dataset(data.name, **data.options)


def check_feature_networks(trainings: list[TrainingJob], store: Store) -> None:
    """Before anything trains: each Inception weights file the sweep's evaluations will
    read is loaded by its backend and run forward on two images, so a truncated or foreign
    file is one UserError now, not a failed evaluation after the training."""
    from benchmark.catalog import dataset_info

    seen = set()
    for job in trainings:
        ev = job.config.eval
        key = (ev.backend, ev.inception_weights)
        if dataset_info(job.config.data.name).metric != "fid" or ev.extractor != "inception-v3" or key in seen:
            continue
        seen.add(key)
        _test_forward(job, store)


def _test_forward(job: TrainingJob, store: Store) -> None:
    import torch

    from benchmark.metrics.fid import FidOptions, build_extractor, image_features

    options = dataclasses.replace(FidOptions.from_eval_config(job.config.eval), progress=False, batch_size=2)
    extractor = build_extractor(options, store.cache_dir(), torch.device("cpu"))
    try:
        features = image_features(torch.zeros(2, 3, 32, 32), extractor, options)
        ok = features.shape == (2, 2048) and bool(torch.isfinite(torch.as_tensor(features)).all())
        why = f"gave features of shape {tuple(features.shape)}, expected (2, 2048) finite values"
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a foreign file fails in the library in many ways
        ok, why = False, f"failed ({type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''})"
    if not ok:
        raise UserError(f"Inception weights {extractor.weights} (eval.backend={options.backend}) {why} in a "
                        f"test forward pass; expected the original file: fetch it again (see docs/metrics.md) "
                        f"or pass eval.inception_weights=<the right file>")


@dataclass
class Failure:
    """A unit that did not finish: ``kind`` training or evaluation, its key, why."""

    kind: str
    key: str
    train_key: str
    error: str


def launch(trainings: list[TrainingJob], evaluations: list[EvalJob], store: Store,
           cfg: LauncherConfig) -> list[Failure]:
    """Phase 1: train what is missing.  Phase 2: evaluate what is missing of what trained.
    Returns what failed: each failed training, then each evaluation point left without a
    record by a failed evaluation task (empty when everything finished)."""
    folder = Path(cfg.folder) if cfg.folder else store.root / "submitit"
    threads = job_threads(cfg)
    failed: list[Failure] = []
    train_tasks = {f"train {j.method_name} {j.key}": j for j in trainings if not store.is_trained(j.key)}
    if train_tasks:
        tasks = [(name, TrainTask(j, str(store.root), threads)) for name, j in train_tasks.items()]
        failed += [Failure("training", train_tasks[o.name].key, train_tasks[o.name].key, o.error)
                   for o in run_tasks(tasks, cfg, folder) if not o.ok]
    eval_tasks: dict[str, tuple[TrainingJob, list[EvalJob]]] = {}
    for job in trainings:
        evals = [ev for ev in evaluations if ev.train_key == job.key]
        if store.is_trained(job.key) and any(not store.has_eval(ev.train_key, ev.key) for ev in evals):
            eval_tasks[f"eval {job.method_name} {job.key}"] = (job, evals)
    if eval_tasks:
        tasks = [(name, EvalTask(job, evals, str(store.root), threads)) for name, (job, evals) in eval_tasks.items()]
        for o in run_tasks(tasks, cfg, folder):
            if not o.ok:
                job, evals = eval_tasks[o.name]
                failed += [Failure("evaluation", ev.key, job.key, o.error) for ev in evals
                           if not store.has_eval(ev.train_key, ev.key)]
    return failed
