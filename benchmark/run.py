"""Run a benchmark sweep: ``python -m benchmark.run key=value ... [--dry-run] [--force]``.

Overrides use Hydra's grammar; a comma list (or ``choice(...)``, ``range(...)``) sweeps.
Each distinct training configuration trains once; every evaluation point reuses its
checkpoint.  Rerunning the same command resumes unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

from benchmark.config import (
    CONFIG_DIR,
    GROUPS,
    compose_points,
    group_choices,
    merge_overrides,
    read_overrides_file,
)
from benchmark.plan import EvalJob, Plan, TrainingJob, plan_points, provisional
from benchmark.schema import UserError
from benchmark.store import Store

USAGE = "usage: python -m benchmark.run [--config FILE] [key=value ...] [--dry-run] [--force] [--help]"


def help_text() -> str:
    lines = [USAGE, "", "Compare few-step generators on one backbone. A comma list sweeps: nfe=1,2,4.", "",
             "config groups (pick one with group=name; override fields with group.field=value):"]
    for group in GROUPS:
        lines.append(f"  {group:<10} {', '.join(group_choices(group))}")
    lines += ["", "top-level keys:",
              "  nfe=N            sampling steps (evaluation axis)",
              "  guidance=W       guidance scale omega, 1 = none (evaluation axis, or training for meanflow)",
              "  seed=S           training seed",
              "  results_dir=DIR  where runs, records and the MLflow store live (default results/)",
              "  tracking.enabled=false   do not mirror to MLflow", "",
              "flags:", "  --dry-run  print the resolved plan (cached or missing per row) and exit",
              "  --force    recompute the requested points even if cached",
              "  --collect  gather and print whatever has finished, launching nothing",
              "  --config FILE  start from the overrides in FILE (e.g. benchmark.tune's best.yaml);",
              "                 key=value arguments win over the file's",
              "", f"configs: {CONFIG_DIR}",
              "example: python -m benchmark.run method=fm nfe=1,2,4,8"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[list[str], set[str]]:
    """(overrides, flags); ``--config FILE`` puts the file's overrides first."""
    argv, files = list(argv), []
    while any(a == "--config" or a.startswith("--config=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
        if argv[i] == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise UserError("--config needs a file: expected --config results/tune/<study>/best.yaml")
            files.append(argv.pop(i + 1))
        else:
            files.append(argv[i].split("=", 1)[1])
        argv.pop(i)
    base: list[str] = []
    for path in files:
        base = merge_overrides(base, read_overrides_file(path))
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--dry-run", "--force", "--collect", "--help", "-h"}
    if unknown:
        raise UserError(f"unknown flag {sorted(unknown)[0]}; expected --dry-run, --force, --collect or --help")
    overrides = merge_overrides(base, [a for a in argv if not a.startswith("-")])
    return overrides, flags | ({"--help"} if "-h" in argv else set())


# ----------------------------------------------------------------------------------------
# Printing


def print_plan(plan: Plan, store: Store) -> None:
    """The dry run's report: each training and evaluation, cached or missing; with files a
    run needs missing, keys are provisional and the reasons are listed at the end."""
    print(f"plan: {len(plan.trainings)} training(s), {len(plan.evaluations)} evaluation(s)")
    unknown = {job.key for job in plan.trainings if provisional(job.identity)}
    for job in plan.trainings:
        state = "cached" if store.is_trained(job.key) else "missing"
        if state == "missing" and store.state_path(job.key).is_file():
            state = "partial (resumes)"
        if provisional(job.identity):
            state = "files not available: provisional key"
        print(f"\ntraining {job.key}  [{state}]  method={job.method_name} model={job.config.model.name} "
              f"data={job.config.data.name} steps={job.config.train.steps}")
        for line in cost_lines(job):
            print(f"  {line}")
        print("  " + json.dumps(job.identity, sort_keys=True))
    print("\nevaluations:")
    for ev in plan.evaluations:
        state = "cached" if store.has_eval(ev.train_key, ev.key) else "missing"
        if ev.train_key in unknown or provisional(ev.identity):
            state = "files not available: provisional key"
        params = "".join(f" {k}={v}" for k, v in ev.method_eval.items())
        print(f"  eval {ev.key}  [{state}]  train={ev.train_key} nfe={ev.nfe} "
              f"(passes {ev.nfe_counted}) guidance={ev.guidance:g}{params}")
    if plan.unavailable:
        print("\nnot available (a real run stops at the first of these, before training):")
        for reason in plan.unavailable:
            print(f"  - {reason}")


def cost_lines(job: TrainingJob) -> list[str]:
    """What a training will spend, printed under it by ``--dry-run``: its budget in steps and
    images seen (the one place a compute estimate for the resolved job belongs)."""
    train = job.config.train
    return [f"budget: {train.steps:,} steps x batch {train.batch_size:,} = "
            f"{train.steps * train.batch_size:,} training images seen"]


def format_table(records: list[dict]) -> str:
    """Method, NFE (steps and counted), the dataset's metrics, seconds per sample."""
    metric_cols = [("fd", "FD"), ("kid", "KID"), ("class_acc", "class acc"), ("swd", "SWD"), ("mmd", "MMD")]
    present = [(k, h) for k, h in metric_cols if any(k in r["metrics"] for r in records)]
    header = ["method", "model", "NFE", "counted", "guidance", *[h for _, h in present], "s/sample"]
    rows = []
    for r in records:
        cells = [r["method"], r["model"], str(r["nfe"]), f"{r['nfe_counted']:g}", f"{r['guidance']:g}"]
        cells += [_fmt(r["metrics"].get(k)) for k, _ in present]
        cells.append(f"{r['sec_per_sample']:.2e}")
        rows.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    floors = {r["metrics"].get("fd_floor") for r in records} - {None}
    if floors:
        out.append(f"FD floor (digits test split vs train split): {min(floors):.3f}")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


# ----------------------------------------------------------------------------------------
# Executing


def execute(plan: Plan, store: Store, force: bool = False, sweep: str = "") -> tuple[list[dict], int]:
    """Train and evaluate what is missing through the launcher, then mirror every record
    to MLflow from this process.  Returns the records that exist and the failure count."""
    from benchmark.launch import launch

    torchrun = _torchrun_world() > 1  # torchrun: every rank runs this; rank 0 leads
    dist = _join_torchrun(plan) if torchrun else None
    if dist is None or dist.is_main():
        if force:
            for job in plan.trainings:
                _forget(store, job, [ev for ev in plan.evaluations if ev.train_key == job.key])
        for job in plan.trainings:
            if not store.is_trained(job.key):
                store.write_config(job.key, {"identity": job.identity})
    if dist is not None:
        dist.barrier()  # the others look at the run folders only once rank 0 has prepared them
        if not dist.is_main():
            _follow_trainings(plan, store)
            return [], 0
    failed = launch(plan.trainings, plan.evaluations, store, plan.trainings[0].config.launcher)
    if dist is not None:
        dist.shutdown()
    records = collect(plan, store)
    mirror(plan, store, sweep)
    return records, len(failed)


def _torchrun_world() -> int:
    """The process count torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _join_torchrun(plan: Plan):
    """Join the torchrun process group; the ``benchmark.distributed`` module (imported only
    here, so a driver without torchrun never imports torch for this)."""
    from benchmark import distributed

    _, world, _ = distributed.init_from_env()
    launcher = plan.trainings[0].config.launcher.name
    if launcher != "inline":
        raise UserError(f"launcher={launcher} under torchrun ({world} processes); expected "
                        f"launcher=inline: the processes train together in this job")
    return distributed


def _follow_trainings(plan: Plan, store: Store) -> None:
    """A non-zero rank: join rank 0's trainings (launch's phase 1, same jobs, same order)
    and nothing else; rank 0 alone writes, evaluates, mirrors and prints the table."""
    from benchmark import distributed
    from benchmark.launch import TrainTask, job_threads

    threads = job_threads(plan.trainings[0].config.launcher)  # as rank 0's task: ranks must agree bit for bit
    for job in [j for j in plan.trainings if not store.is_trained(j.key)]:
        TrainTask(job, str(store.root), threads)()
    distributed.shutdown()


def collect(plan: Plan, store: Store) -> list[dict]:
    """The records of the plan's evaluation points that exist on disk, in plan order."""
    return [store.read_eval(ev.train_key, ev.key) for ev in plan.evaluations
            if store.has_eval(ev.train_key, ev.key)]


def mirror(plan: Plan, store: Store, sweep: str = "") -> None:
    """Mirror finished trainings and evaluations to MLflow (idempotent; never fatal)."""
    from benchmark.tracking import Tracker

    trackers: dict[tuple, Tracker] = {}
    for job in plan.trainings:
        if not (job.config.tracking.enabled and store.is_trained(job.key)):
            continue
        tracker = trackers.setdefault(tuple(vars(job.config.tracking).values()),
                                      Tracker(job.config.tracking, store, sweep))
        summary = store.read_final_summary(job.key)
        tracker.log_training(job.key, job.identity, summary["curve"], summary["seconds"])
        for ev in plan.evaluations:
            if ev.train_key == job.key and store.has_eval(ev.train_key, ev.key):
                tracker.log_evaluation(job.key, job.identity, store.read_eval(ev.train_key, ev.key))


def _forget(store: Store, job: TrainingJob, evals: list[EvalJob]) -> None:
    """--force: drop this training's checkpoints and the requested evaluation records."""
    for path in (store.state_path(job.key), store.final_path(job.key)):
        path.unlink(missing_ok=True)
    for ev in evals:
        store.eval_path(ev.train_key, ev.key).unlink(missing_ok=True)
    ledger = store.run_dir(job.key) / "mlflow.json"
    if ledger.is_file():
        shutil.copy(ledger, ledger.with_suffix(".json.bak"))
        ledger.unlink()


def _follower() -> bool:
    """A non-zero torchrun rank (it only trained; rank 0 reports)."""
    return _torchrun_world() > 1 and os.environ.get("RANK", "0") != "0"


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... --dry-run | head` ends quietly
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides, flags = parse_args(argv)
        if "--help" in flags:
            print(help_text())
            return 0
        plan = plan_points(compose_points(overrides), dry_run="--dry-run" in flags)
        for notice in plan.notices:
            print(f"notice: {notice}")
        if plan.skipped:
            print(f"notice: skipped {len(plan.skipped)} point(s) a method cannot honour: "
                  + "; ".join(plan.skipped))
        store = Store(plan.trainings[0].config.results_dir)
        if "--dry-run" in flags:
            print_plan(plan, store)
            return 0
        if "--collect" in flags:
            records = collect(plan, store)
            mirror(plan, store)
            missing = len(plan.evaluations) - len(records)
            if records:
                print(format_table(records))
            print(f"collected {len(records)} of {len(plan.evaluations)} evaluation(s); {missing} missing")
            return 0
        start = time.perf_counter()
        records, failures = execute(plan, store, force="--force" in flags, sweep=" ".join(overrides))
        if records:
            print(format_table(records))
        if _follower():
            return 0  # a non-zero torchrun rank only trained: rank 0 reports
        print(f"done in {time.perf_counter() - start:.1f} s; records under {store.root}/runs")
        if failures:
            print(f"error: {failures} job(s) failed (listed above); nothing of them was cached: "
                  f"rerun the same command to retry", file=sys.stderr)
            return 1
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        from benchmark.train import TrainingDiverged

        if isinstance(err, TrainingDiverged):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
