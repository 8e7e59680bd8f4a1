"""Tune hyperparameters with Optuna: ``python -m benchmark.tune tune=<space> key=value ...``.

The search space lives in ``configs/tune/<space>.yaml``: a distribution (float, int, with
optional log scale or step, or categorical) over any key of the resolved config, method
fields included, plus the objective (a recorded metric at one NFE; its direction follows
the metric), the trial budget, the sampler and the pruner.  The other ``key=value``
arguments are the base configuration every trial starts from (Hydra's grammar, no
sweeps); ``tune.<field>=value`` overrides a field of the space file.

Every trial is an ordinary benchmark run: its overrides go through the same composer,
planner, cache and launcher as ``benchmark.run``, so an identical trial is not retrained
(a finished one is not even launched) and the tuned configuration's checkpoint is reused
when it is benchmarked afterwards.  Trials run in parallel through the launcher
(``launcher=local`` processes or SLURM jobs, ``launcher.max_parallel`` at once) with the
Optuna study as shared state: the driver asks the sampler for parameters and tells
results; a trial job trains in segments of ``report_every`` steps, evaluates the
objective at each intermediate checkpoint (cached under ``runs/<key>/rungs/``) and
reports it to the study, whose pruner may stop it there.

Storage is a sqlite file under ``results_dir`` unless ``tune.storage`` names another
(an RDB URL, or ``journal:///path/file.log`` for a shared filesystem without a database).
Rerunning the same command continues the same study: trials a killed driver left running
are run again under their own numbers (their runs resume from checkpoints), so no trial is
lost or counted twice; a trial that fails is recorded as failed with its reason and the
study goes on.  Each finished trial is mirrored to MLflow as a child of the study's
parent run.  At the end ``results_dir/tune/<study>/`` holds the trials (CSV), a table of
the best (Markdown), Optuna's history, intermediate-value and importance plots, and
``best.yaml``, which ``python -m benchmark.run --config <file>`` accepts.

This module is the command line; the work is done in :mod:`benchmark.tuning`.
"""

from __future__ import annotations

import signal
import sys
import time

from benchmark.cli import entry
from benchmark.config import group_choices
from benchmark.schema import UserError
from benchmark.tuning.driver import drive
from benchmark.tuning.space import TUNE_HELP
from benchmark.tuning.study import Tuning, resolve
from benchmark.tuning.trial import rung_steps

USAGE = "usage: python -m benchmark.tune tune=<space> [tune.field=value ...] [key=value ...] [--dry-run] [--help]"


def help_text() -> str:
    lines = [USAGE, "", "Tune a method with Optuna; every trial is an ordinary benchmark run (cached, launched,",
             "mirrored to MLflow). The other key=value arguments are the base config of every trial.", "",
             f"spaces (configs/tune/): {', '.join(group_choices('tune'))}", "", "tune fields (tune.<field>=value):"]
    lines += [f"  {name:<13} {text}" for name, text in TUNE_HELP.items()]
    lines += ["", "flags:", "  --dry-run  print the study, its search space and the base run, and exit", "",
              "example: python -m benchmark.tune tune=meanflow_digits launcher=local",
              "live view: optuna-dashboard sqlite:///results/optuna.db   (serves on localhost:8080)"]
    return "\n".join(lines)


def print_dry_run(tuning: Tuning) -> None:
    print(f"study {tuning.study_name}  storage {tuning.storage}")
    print(f"objective: {tuning.direction} {tuning.cfg.metric} at nfe={tuning.cfg.nfe}; {tuning.cfg.n_trials} trials, "
          f"{tuning.base_config.launcher.max_parallel if tuning.base_config.launcher.name != 'inline' else 1} "
          f"at once (launcher={tuning.base_config.launcher.name})")
    print(f"sampler {tuning.cfg.sampler}; pruner {tuning.cfg.pruner}; rungs at steps "
          f"{rung_steps(tuning.cfg.report_every, tuning.base_config.train.steps) or 'none (no pruning)'}")
    print("search space:")
    for p in tuning.params:
        what = f"one of {list(p.choices)}" if p.type == "categorical" else \
            f"[{p.low}, {p.high}]" + (" log" if p.log else "") + (f" step {p.step}" if p.step else "")
        print(f"  {p.key}: {p.type} {what}")
    print(f"base: {' '.join(tuning.base) or '(defaults)'}")


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return entry(_main, argv, help_text, interrupted="interrupted: rerun the same command to continue the study")


def _main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("-")}
    unknown = flags - {"--dry-run"}
    if unknown:
        raise UserError(f"unknown flag {sorted(unknown)[0]}; expected --dry-run or --help")
    tuning = resolve([a for a in argv if not a.startswith("-")])
    if "--dry-run" in flags:
        print_dry_run(tuning)
        return 0
    start = time.perf_counter()
    failed = drive(tuning)
    print(f"done in {time.perf_counter() - start:.1f} s"
          + (f"; {failed} trial(s) failed (reasons above and in trials.csv)" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
