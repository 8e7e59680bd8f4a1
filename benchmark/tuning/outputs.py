"""What a study leaves under ``results_dir/tune/<study>/``: the trials (``trials.csv``), the
best ones (``best.md``), the best configuration (``best.yaml``, which ``benchmark.run
--config`` accepts) and Optuna's history, intermediate-value and importance plots.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

from benchmark.config import override_key
from benchmark.store import atomic_write_bytes
from benchmark.tuning.study import Tuning
from benchmark.tuning.trial import trial_overrides


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     "last_step": t.last_step, **t.params,
                     "train_key": t.system_attrs.get("bench:train_key", ""),
                     "seconds": duration, "reason": t.user_attrs.get("fail_reason", "")})
    return rows


def best_table(tuning: Tuning, study) -> str:
    """Markdown: the best ``top`` complete trials, best first."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    done.sort(key=lambda t: t.value, reverse=tuning.direction == "maximize")
    keys = [p.key for p in tuning.params]
    header = ["trial", f"{tuning.cfg.metric} @ {tuning.cfg.nfe} NFE", *keys, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for t in done[:tuning.cfg.top]:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        cells = [str(t.number), f"{t.value:.4f}", *(_cell(t.params.get(k)) for k in keys), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines.append(f"\n{sum(counts.values())} trials: {counts['complete']} complete, {counts['pruned']} pruned, "
                 f"{counts['fail']} failed (study {tuning.study_name})")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def export_best(tuning: Tuning, study) -> Path | None:
    """``best.yaml``: the best trial's overrides (without nfe, so the benchmark can sweep it)."""
    import yaml
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    overrides = [o for o in trial_overrides(tuning.base, best.params, tuning.cfg.nfe) if override_key(o) != "nfe"]
    path = tuning.study_dir / "best.yaml"
    header = (f"# Best trial ({best.number}) of Optuna study {tuning.study_name}: {tuning.cfg.metric} = "
              f"{best.value:.6g} at nfe={tuning.cfg.nfe} ({tuning.direction}).\n"
              f"# Benchmark it: python -m benchmark.run --config {path} nfe=1,2,4\n"
              f"# (command-line overrides win over the ones below)\n")
    body = {"study": tuning.study_name, "trial": best.number, "metric": tuning.cfg.metric, "nfe": tuning.cfg.nfe,
            "value": float(best.value), "params": dict(best.params), "overrides": overrides}
    atomic_write_bytes(path, (header + yaml.safe_dump(body, sort_keys=False)).encode())
    return path


def write_outputs(tuning: Tuning, study) -> None:
    """trials.csv, best.md, best.yaml and Optuna's plots under results_dir/tune/<study>/."""
    folder = tuning.study_dir
    rows = trial_rows(study)
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(folder / "trials.csv", buffer.getvalue().encode())
    table = best_table(tuning, study)
    atomic_write_bytes(folder / "best.md", (table + "\n").encode())
    best = export_best(tuning, study)
    plots = write_plots(study, folder)
    print(table)
    if best is not None:
        print(f"best config: {best}\n  benchmark it: python -m benchmark.run --config {best} nfe=1,2,4")
    print(f"trials, table and plots ({', '.join(plots) or 'none yet'}) under {folder}")


def write_plots(study, folder: Path) -> list[str]:
    """Optuna's history, intermediate values and parameter importances as PNGs (each
    skipped when the study has too little for it yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials yet" and the like
    made = []
    for name, fn in (("history", ovm.plot_optimization_history), ("intermediate", ovm.plot_intermediate_values),
                     ("importance", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4.5)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            atomic_write_bytes(folder / f"{name}.png", buffer.getvalue())
            made.append(f"{name}.png")
        except Exception:  # noqa: BLE001 - e.g. importances need two complete trials; plots are extras
            plt.close("all")
    return made
