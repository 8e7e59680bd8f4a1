"""Run a benchmark sweep: ``python -m benchmark.run key=value ... [--dry-run] [--force | --force-train]``.

Overrides use Hydra's grammar; a comma list (or ``choice(...)``, ``range(...)``) sweeps.
Each distinct training configuration trains once; every evaluation point reuses its
checkpoint.  Rerunning the same command resumes unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from benchmark.cli import entry
from benchmark.config import (
    CONFIG_DIR,
    GROUPS,
    compose_points,
    group_choices,
    merge_overrides,
    read_overrides_file,
)
from benchmark.mirror import mirror, prepare_run_folder
from benchmark.plan import EvalJob, Plan, TrainingJob, plan_points, provisional
from benchmark.schema import UserError
from benchmark.store import Store

USAGE = "usage: python -m benchmark.run [--config FILE] [key=value ...] [--dry-run] [--force] [--force-train] [--help]"


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
              "  --force    recompute the requested evaluation points, reusing their checkpoints",
              "  --force-train  retrain the requested checkpoints and recompute the requested points;",
              "                 other evaluations of those checkpoints are removed (stale)",
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
    flags = {a for a in argv if a.startswith("-")}
    unknown = sorted(flags - set(FLAGS))
    if unknown:  # one dash too (-dry-run): a flag that is not one is never silently ignored
        raise UserError(f"unknown flag {unknown[0]}; expected {', '.join(FLAGS)}, --config FILE or --help "
                        f"(two dashes), then key=value overrides")
    overrides = merge_overrides(base, [a for a in argv if not a.startswith("-")])
    return overrides, flags


FLAGS = ("--dry-run", "--force", "--force-train", "--collect")


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
              f"(passes {ev.nfe_counted}) guidance={ev.guidance:g} ema={ev.eval.ema}{params}")
    if plan.unavailable:
        print("\nnot available (a real run stops at the first of these, before training):")
        for reason in plan.unavailable:
            print(f"  - {reason}")


def cost_lines(job: TrainingJob) -> list[str]:
    """What a training will spend, printed under it by ``--dry-run``: its budget in steps and
    images seen, and its counted training FLOPs with the GPU-hours they take
    (``benchmark.flops.cost_estimate_line``)."""
    from benchmark.flops import cost_estimate_line  # imports torch: counted on small stand-ins

    train = job.config.train
    return [f"budget: {train.steps:,} steps x batch {train.batch_size:,} = "
            f"{train.steps * train.batch_size:,} training images seen",
            cost_estimate_line(job.config, job.method_name, job.method_train)]


def format_table(records: list[dict]) -> str:
    """Method, NFE (steps and counted), guidance, EMA, each dataset's table metrics as
    ``value ± half-width of the 95% interval``, seconds per sample; then the floors."""
    from benchmark.table import FLOORS, metric_info, table_metrics

    names = list(dict.fromkeys(m for r in records for m in table_metrics(r["data"])))
    present = [m for m in names if any(m in r["metrics"] for r in records)]
    header = ["method", "model", "NFE", "counted", "guidance", "EMA",
              *[metric_info(m).label for m in present], "s/sample"]
    rows = []
    for r in records:
        cells = [r["method"], r["model"], str(r["nfe"]), f"{r['nfe_counted']:g}", f"{r['guidance']:g}",
                 str(r.get("ema", "-"))]
        cells += [_fmt(r["metrics"].get(m), r.get("intervals", {}).get(m), metric_info(m)) for m in present]
        cells.append(f"{r['sec_per_sample']:.2e}")
        rows.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    for metric, floor in FLOORS.items():
        have = [r for r in records if floor in r["metrics"]]
        if have and metric in present:
            out.append(f"{metric_info(floor).label} (297 held-out test images, measured like the rows): "
                       f"{_fmt(have[0]['metrics'][floor], have[0].get('intervals', {}).get(floor))}")
    if any(r.get("intervals") for r in records):
        out.append("± : half-width of the 95% bootstrap interval of each evaluation (sampling noise)")
    out += chance_warnings(records)
    return "\n".join(out)


CHANCE_CLASSES = {"digits": 10}
"""Datasets whose ``class_acc`` has a known chance level (1 / classes)."""


def chance_warnings(records: list[dict]) -> list[str]:
    """A line for every evaluation whose class accuracy cannot be told from chance (its 95%
    interval holds 1/K): its samples ignore their labels, whatever its FD says."""
    lines = []
    for r in records:
        k, lo_hi = CHANCE_CLASSES.get(r["data"]), r.get("intervals", {}).get("class_acc")
        if k and lo_hi and lo_hi[0] <= 1 / k <= lo_hi[1]:
            lines.append(f"warning: {r['method']} nfe={r['nfe']} ema={r.get('ema', '-')}: class accuracy "
                         f"{r['metrics']['class_acc']:.3f} is at chance (1/{k}): its samples ignore their "
                         f"labels; train longer (train.steps={r.get('train_steps')})")
    return lines


def _fmt(v, interval=None, info=None) -> str:
    """A value (printed as its registered metric says, ``info``) and its interval's half-width."""
    if v is None:
        return "-"
    text = info.format(v) if info is not None else f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    if interval and all(x is not None and x == x for x in interval):
        half = (interval[1] - interval[0]) / 2
        text += f" ± {half:.4f}" if abs(half) >= 1e-3 else f" ± {half:.1e}"
    return text


# ----------------------------------------------------------------------------------------
# Executing


def execute(plan: Plan, store: Store, force: bool = False, sweep: str = "",
            force_train: bool = False) -> tuple[list[dict], list]:
    """Train and evaluate what is missing through the launcher, then mirror every record
    to MLflow from this process.  ``force``: the plan's evaluation points are recomputed
    from their checkpoints; ``force_train``: its trainings too (``_forget``).  Returns the
    records that exist and what failed (``benchmark.launch.Failure``: each failed training
    and evaluation point)."""
    from benchmark.launch import check_embedded_data, check_feature_networks, launch

    force = force or force_train
    check_embedded_data(plan.trainings)  # a data.options value its loader refuses fails before any folder
    if force or not all(store.has_eval(ev.train_key, ev.key) for ev in plan.evaluations):
        check_feature_networks(plan.trainings, store)  # a bad Inception file fails now, not after training
    torchrun = _torchrun_world() > 1  # torchrun: every rank runs this; rank 0 leads
    dist = _join_torchrun(plan) if torchrun else None
    if dist is None or dist.is_main():
        if force:
            for job in plan.trainings:
                _forget(store, job, [ev for ev in plan.evaluations if ev.train_key == job.key], force_train)
        for job in plan.trainings:
            prepare_run_folder(store, job)
    if dist is not None:
        dist.barrier()  # the others look at the run folders only once rank 0 has prepared them
        if not dist.is_main():
            _follow_trainings(plan, store)
            return [], []
    failed = launch(plan.trainings, plan.evaluations, store, plan.trainings[0].config.launcher)
    if dist is not None:
        dist.shutdown()
    records = collect(plan, store)
    mirror(plan, store, sweep)
    return records, failed


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
    """The records of the plan's evaluation points that exist on disk, in plan order (a
    corrupt one is moved aside and left out)."""
    records = [store.read_record(store.eval_path(ev.train_key, ev.key)) for ev in plan.evaluations]
    return [r for r in records if r is not None]


def _forget(store: Store, job: TrainingJob, evals: list[EvalJob], train: bool) -> None:
    """``--force``: drop the requested evaluation records and sample grids of this training
    (its checkpoint stays: they are recomputed from it).  ``--force-train`` (``train``):
    also its checkpoints, EMA snapshots, curve and summary, so it trains again from step 0,
    and every other evaluation of it, which measured the checkpoint that is gone: those
    are removed (said in one line) and their MLflow runs deleted.  The MLflow runs of the
    recomputed points and of the training are updated in place when mirrored."""
    for ev in evals:
        for path in (store.eval_path(ev.train_key, ev.key, ev.rung), store.grid_path(ev.train_key, ev.key)):
            path.unlink(missing_ok=True)
    if not train:
        return
    run = store.run_dir(job.key)
    for path in (store.state_path(job.key), store.final_path(job.key), run / "summary.json", run / "curve.csv",
                 *store.ema_snapshot_paths(job.key), *run.glob("rungs/*.json"), *run.glob("samples/*.png")):
        path.unlink(missing_ok=True)
    stale = sorted(p.stem for p in run.glob("evals/*.json"))
    for key in stale:
        store.eval_path(job.key, key).unlink(missing_ok=True)
    if stale:
        print(f"notice: --force-train removed {len(stale)} evaluation(s) of training {job.key} that this "
              f"command does not recompute (they measured the old checkpoint): {', '.join(stale)}; a "
              f"command naming them computes them again")
        if job.config.tracking.enabled:
            from benchmark.tracking import Tracker

            Tracker(job.config.tracking, store).forget_evaluations(stale)


def report_failures(plan: Plan, failures: list, recorded: int) -> None:
    """One line per failed unit: its key, the override values that set it apart from the
    sweep's other points, and why; then what to do."""
    for f in failures:
        position = 1 if f.kind == "training" else 2
        apart = distinguishing(plan.origins, f.key, position)
        where = f" ({' '.join(apart)})" if apart else ""
        skipped = sum(1 for ev in plan.evaluations if ev.train_key == f.key) if f.kind == "training" else 0
        also = f"; its {skipped} evaluation point(s) did not run" if skipped else ""
        of = f" of training {f.train_key}" if f.kind == "evaluation" else ""
        print(f"failed: {f.kind} {f.key}{of}{where}: {f.error}{also}", file=sys.stderr)
    trainings = sum(1 for f in failures if f.kind == "training")
    print(f"error: {trainings} training(s) and {len(failures) - trainings} evaluation(s) failed (listed "
          f"above; nothing of them was cached); the {recorded} point(s) that finished are recorded: rerun "
          f"the same command to retry only the failed ones", file=sys.stderr)


def distinguishing(origins: list[tuple[tuple[str, ...], str, str]], key: str, position: int) -> list[str]:
    """The overrides every sweep point that made ``key`` (its train key at ``position`` 1,
    eval key at 2) shares, among those whose value varies over the sweep: what sets it apart."""
    from benchmark.config import override_key

    mine = [origin[0] for origin in origins if origin[position] == key]
    if not mine:
        return []
    values: dict[str, set[str]] = {}
    for overrides, *_ in origins:
        for o in overrides:
            values.setdefault(override_key(o), set()).add(o)
    shared = set(mine[0]).intersection(*mine[1:])
    return [o for o in mine[0] if o in shared and len(values[override_key(o)]) > 1]


def _follower() -> bool:
    """A non-zero torchrun rank (it only trained; rank 0 reports)."""
    return _torchrun_world() > 1 and os.environ.get("RANK", "0") != "0"


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... --dry-run | head` ends quietly
    return entry(_main, argv, help_text, interrupted="interrupted: rerun the same command to resume")


def _main(argv: list[str]) -> int:
    overrides, flags = parse_args(argv)
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
    records, failures = execute(plan, store, force="--force" in flags, sweep=" ".join(overrides),
                                 force_train="--force-train" in flags)
    if records:
        print(format_table(records))
    if _follower():
        return 0  # a non-zero torchrun rank only trained: rank 0 reports
    print(f"done in {time.perf_counter() - start:.1f} s; records under {store.root}/runs")
    if failures:
        report_failures(plan, failures, len(records))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
