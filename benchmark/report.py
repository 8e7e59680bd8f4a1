"""Comparison tables, plots and the executed report notebook, in one command.

    python -m benchmark.report [column=value[,value...] ...] [results_dir=DIR] [out=DIR]
                               [notebook_dir=DIR] [metric=NAME] [cost=AXIS] [--no-notebook] [--publish]

1. rebuilds the long-format table ``results/tables/results.{parquet,csv}`` from the records;
2. keeps the rows matching every filter (``method=fm,imf data=digits nfe=1,2``; any column
   of the table works: ``train.steps=3000``, ``guidance=1``);
3. writes the comparison tables as Markdown, CSV, LaTeX and HTML under ``results/report/``:
   method x NFE per model size, guidance sweeps, the best guidance scale (chosen on a
   separate evaluation seed), model-size scaling, and quality against a counted cost with
   its Pareto front; mean ± a 95% interval on every cell, a best cell bold only where it
   is resolved from the runner-up;
4. draws the seaborn plots into ``results/report/plots/``;
5. executes ``reports/benchmark_report.py`` (a jupytext notebook that reads only the
   table) into ``results/report/benchmark_report.ipynb`` and a self-contained ``.html``;
6. with ``--publish`` only, copies the summary tables and plots to the tracked
   ``reports/benchmark_report.md`` and ``reports/benchmark_report_figures/`` (what the
   README shows).  Without it nothing outside the results folder is written.

Nothing here is hand-edited: rerun the command after a sweep and everything follows.
"""

from __future__ import annotations

import html
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.cli import entry
from benchmark.compare import (
    COST_AXES,
    REPORTED_EVAL_SEED,
    aggregate,
    at_reference,
    cost_axis,
    ema_order,
    method_rank,
    model_order,
    pareto_front,
    reported_rows,
    short_value,
    size_key,
)
from benchmark.schema import Failure, UserError
from benchmark.store import atomic_write_bytes
from benchmark.table import (
    FLOORS,
    config_columns,
    metric_info,
    quality_metric,
    read_table,
    rebuild,
    table_metrics,
)

REPO = Path(__file__).resolve().parents[1]


def _notebook_source() -> Path:
    """The report notebook: installed from a wheel it is package data
    (``benchmark/reports/benchmark_report.py``, copied by setup.py); in a checkout or an
    editable install, the tracked ``reports/benchmark_report.py`` itself."""
    from importlib.resources import files

    packaged = files("benchmark") / "reports" / "benchmark_report.py"
    if packaged.is_file():
        return Path(str(packaged))
    return REPO / "reports" / "benchmark_report.py"


NOTEBOOK_SOURCE = _notebook_source()
CHECKOUT = (REPO / "README.md").is_file() and (REPO / "reports").is_dir()
"""Whether this module runs from a checkout (whose README and reports/ ``--publish`` and
``readme=`` rewrite) rather than from an installed wheel."""
USAGE = ("usage: python -m benchmark.report [column=value[,value...] ...] [results_dir=DIR] [out=DIR] "
         "[notebook_dir=DIR] [metric=NAME] [cost=AXIS] [readme=NAME] [--no-notebook] [--publish] [--help]")
OPTIONS = ("results_dir", "out", "notebook_dir", "metric", "cost", "readme")
KINDS = {"method_nfe": "Method × NFE", "guidance": "Guidance scale sweeps",
         "best_guidance": "Best guidance scale (chosen on a separate evaluation seed)",
         "model_size": "Model-size scaling", "ema": "Evaluation weights (raw vs. post-hoc EMA)",
         "pareto": "Quality vs. sampling cost (Pareto front)"}


# ----------------------------------------------------------------------------------------
# Selecting rows


def parse_filters(pairs: list[str], df: pd.DataFrame) -> dict[str, list[str]]:
    """``column=v1,v2`` pairs; the column must exist in the table."""
    filters: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise UserError(f"filter '{pair}' is not column=value; expected e.g. method=fm,imf or nfe=1,2")
        if key not in df.columns:
            common = [c for c in ("method", "model", "data", "nfe", "guidance", "seed") if c in df.columns]
            raise UserError(f"unknown filter column '{key}'; expected one of {', '.join(common)} or any "
                            f"table column (e.g. train.steps); see results/tables/results.csv for all")
        filters[key] = [v for v in value.split(",") if v]
    return filters


def _matches(column: pd.Series, wanted: list[str]) -> pd.Series:
    """Numbers compare as numbers (``guidance=2`` matches 2.0), everything else as text."""
    if pd.api.types.is_bool_dtype(column):
        return column.isin([w.lower() in ("1", "true", "yes") for w in wanted])
    if pd.api.types.is_numeric_dtype(column):
        values = []
        for w in wanted:
            try:
                values.append(float(w))
            except ValueError:
                raise UserError(f"filter {column.name}={w!r} is not a number; expected numbers like "
                                f"{', '.join(sorted({f'{v:g}' for v in column.dropna()})[:6])}") from None
        return column.astype(float).isin(values)
    return column.astype(str).isin(wanted)


def select(df: pd.DataFrame, filters: dict[str, list[str]]) -> pd.DataFrame:
    """The rows matching every filter; a filter that matches nothing is a ``UserError``."""
    if df.empty:
        raise UserError("the results table is empty: no evaluation records under results_dir/runs; "
                        "expected some from python -m benchmark.run (e.g. method=fm nfe=1,2) first")
    keep = pd.Series(True, index=df.index)
    for key, wanted in filters.items():
        keep &= _matches(df[key], wanted)
    if not keep.any():
        asked = " ".join(f"{k}={','.join(v)}" for k, v in filters.items())
        held = "; ".join(f"{k}: {', '.join(map(str, sorted(df[k].dropna().unique(), key=str)[:8]))}"
                         for k in filters)
        raise UserError(f"no evaluation matches {asked}; the table holds {held}; "
                        f"expected values from those (or run python -m benchmark.run for them)")
    return df[keep].reset_index(drop=True)


# ----------------------------------------------------------------------------------------
# Labels and aggregation over seeds


# ----------------------------------------------------------------------------------------
# Comparison tables


def fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def fmt_cell(mean: float, lo: float, hi: float) -> str:
    """``mean ± half-width`` of its 95% interval (the mean alone when there is none)."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (lo, hi)):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt((hi - lo) / 2)}"


@dataclass
class Table:
    """A rendered comparison: display cells, which are best, and the numbers behind them."""

    kind: str
    title: str
    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]
    numbers: pd.DataFrame
    note: str = ""
    meta: dict = field(default_factory=dict)

    def to_markdown(self) -> str:
        def line(cells): return "| " + " | ".join(cells) + " |"
        body = [[f"**{c}**" if b else c for c, b in zip(r, bs)] for r, bs in zip(self.rows, self.bold)]
        out = [line(self.header), line(["---"] * len(self.header)), *map(line, body)]
        return "\n".join(out)

    def to_html(self) -> str:
        # inline styles: the table looks the same in the notebook, its HTML and alone
        cell = "padding:.25em .6em;border:1px solid #ccc;text-align:{}"
        def td(c: str, b: bool, j: int) -> str:
            style = cell.format("left" if j == 0 else "right") + (";background:#e6f4e6" if b else "")
            return f"<td style='{style}'>" + (f"<b>{html.escape(c)}</b>" if b else html.escape(c)) + "</td>"
        head = "".join(f"<th style='{cell.format('left' if j == 0 else 'right')}'>{html.escape(h)}</th>"
                       for j, h in enumerate(self.header))
        body = "".join("<tr>" + "".join(td(c, b, j) for j, (c, b) in enumerate(zip(r, bs))) + "</tr>"
                       for r, bs in zip(self.rows, self.bold))
        title = f"<p style='font-weight:bold;margin:1.2em 0 .3em'>{html.escape(self.title)}</p>"
        note = f"<p style='color:#555;margin:.3em 0 1em'>{html.escape(self.note)}</p>" if self.note else ""
        return (f"{title}<table class='comparison' style='border-collapse:collapse'><thead><tr>{head}</tr>"
                f"</thead><tbody>{body}</tbody></table>{note}")

    def to_latex(self) -> str:
        def tex(s: str) -> str:
            s = s.replace("\\", r"\textbackslash{}")
            for ch in "&%$#_{}":
                s = s.replace(ch, "\\" + ch)
            for text, latex in (("±", r"$\pm$"), ("×", r"$\times$"), ("·", r"$\cdot$"), ("ω", r"$\omega$"),
                                ("–", "--"), ("✓", r"$\checkmark$")):
                s = s.replace(text, latex)
            return s
        rows = [" & ".join(rf"\textbf{{{tex(c)}}}" if b else tex(c) for c, b in zip(r, bs)) + r" \\"
                for r, bs in zip(self.rows, self.bold)]
        spec = "l" + "r" * (len(self.header) - 1)
        return "\n".join([r"\begin{table}[ht]", r"\centering", rf"\caption{{{tex(self.title)}}}",
                          rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                          " & ".join(tex(h) for h in self.header) + r" \\", r"\midrule", *rows,
                          r"\bottomrule", r"\end{tabular}", r"\end{table}"])


def _metric_title(metric: str) -> str:
    info = metric_info(metric)
    better = {True: "lower is better", False: "higher is better"}.get(info.lower_is_better, "")
    return f"{info.label} ({better})" if better else info.label


SIGNIFICANCE = 0.05
"""Level of the one-sided test a best cell must pass against the runner-up."""


def resolved_better(a: dict, b: dict, lower: bool) -> bool:
    """Is cell ``a`` significantly better than cell ``b``?  Each is {mean, lo, hi, values}.

    With at least two seeds on both sides: Welch's t-test, one-sided, at level
    ``SIGNIFICANCE``.  Otherwise (one evaluation on a side): the two 95% intervals must not
    overlap, a conservative test (non-overlap of 95% intervals implies p < 0.01)."""
    from scipy import stats

    sign = 1.0 if lower else -1.0
    if len(a["values"]) > 1 and len(b["values"]) > 1:
        with warnings.catch_warnings():  # identical seeds (class accuracy 1.0 three times): scipy warns
            warnings.simplefilter("ignore", RuntimeWarning)  # of cancellation; t is then exact (or NaN: a tie)
            t, p = stats.ttest_ind(a["values"], b["values"], equal_var=False)
        return bool(sign * t < 0 and p / 2 < SIGNIFICANCE)
    if any(math.isnan(x) for x in (a["lo"], a["hi"], b["lo"], b["hi"])):
        return False
    return a["hi"] < b["lo"] if lower else a["lo"] > b["hi"]


def _best_mask(cells: pd.DataFrame, metric: str) -> pd.DataFrame:
    """True where a cell holds its column's best mean *and* is resolved better than the
    runner-up (:func:`resolved_better`); a column with one entry marks nothing.  ``cells``
    holds per cell a dict {mean, lo, hi, values} or NaN."""
    lower = metric_info(metric).lower_is_better
    mask = cells.map(lambda _: False)
    if lower is None:
        return mask
    for col in cells.columns:
        entries = [(i, c) for i, c in cells[col].items() if isinstance(c, dict) and not math.isnan(c["mean"])]
        if len(entries) < 2:
            continue
        entries.sort(key=lambda e: e[1]["mean"] if lower else -e[1]["mean"])
        (best_i, best), (_, runner_up) = entries[0], entries[1]
        mask.at[best_i, col] = resolved_better(best, runner_up, lower)
    return mask


def resolution_words(cells: pd.DataFrame, best: pd.DataFrame, col_name: str) -> str:
    """In words, per column with two or more entries: who leads and whether the lead over
    the runner-up is resolved (``best`` from :func:`_best_mask`)."""
    resolved, open_ = [], []
    for col in cells.columns:
        entries = [i for i, c in cells[col].items() if isinstance(c, dict) and not math.isnan(c["mean"])]
        if len(entries) < 2:
            continue
        winner = next((i for i in entries if best.at[i, col]), None)
        if winner is not None:
            resolved.append(f"{col_name} {short_value(col)}: {winner}")
        else:
            open_.append(f"{col_name} {short_value(col)}")
    words = []
    if resolved:
        words.append("Resolved leads: " + "; ".join(resolved))
    if open_:
        words.append("Not resolved (the leader is within noise of the runner-up): " + ", ".join(open_))
    return ". ".join(words)


def _cells(agg: pd.DataFrame, metric: str, row: str, col: str) -> dict[tuple, dict]:
    """(row, col) -> {mean, lo, hi, std, n, values} of one configuration's metric."""
    out = {}
    for _, r in agg.iterrows():
        out[(r[row], r[col])] = {"mean": float(r[metric]), "lo": float(r[f"{metric}.lo"]),
                                 "hi": float(r[f"{metric}.hi"]), "std": float(r[f"{metric}.std"]),
                                 "n": int(r["n"]), "values": [float(v) for v in r[f"{metric}.values"]
                                                              if not pd.isna(v)]}
    return out


def _seeded_cell(cell: dict, most: int) -> str:
    """A pivot cell's ``mean ± half-width``, marked ``(n=k)`` when it rests on fewer seeds than
    the table's best-covered cells, so a reader does not take its interval for theirs."""
    text = fmt_cell(cell["mean"], cell["lo"], cell["hi"])
    return f"{text} (n={cell['n']})" if cell["n"] < most else text


def interval_note(agg: pd.DataFrame, metric: str) -> str:
    """One sentence on what the ± means and how the best cell was decided."""
    seeds, fewest = int(agg["n"].max()), int(agg["n"].min())
    what = (f"mean ± half-width of the 95% interval over {seeds} training seeds (Student's t)" if seeds > 1
            else "value ± half-width of its 95% bootstrap interval (sampling noise of one evaluation; one seed)")
    if seeds > 1 and fewest == 1:
        what += "; a cell from one seed: its evaluation's 95% bootstrap interval (sampling noise only)"
    if fewest < seeds:
        what += f"; (n=k): a cell over k < {seeds} seeds"
    if metric_info(metric).lower_is_better is None:
        return f"{what}; a diagnostic, nothing is marked best"
    test = ("Welch's one-sided t-test at 5% over seeds" if seeds > 1
            else "non-overlapping 95% intervals")
    if seeds > 1 and fewest == 1:
        test += "; non-overlapping 95% intervals where a side has one seed"
    return f"{what}; bold: the best of a column, only where it beats the runner-up ({test})"


def pivot_table(agg: pd.DataFrame, metric: str, row: str, col: str, cols: list, kind: str,
                title: str, row_name: str, col_name: str) -> Table:
    """Rows x columns of ``metric`` (mean ± 95% half-width) with a column's best cell marked
    where the difference to the runner-up is resolved."""
    cells = _cells(agg, metric, row, col)
    most = int(agg["n"].max())
    labels = list(dict.fromkeys(agg[row]))
    grid = pd.DataFrame([[cells.get((label, c), math.nan) for c in cols] for label in labels],
                        index=labels, columns=cols, dtype=object)
    best = _best_mask(grid, metric)
    header = [row_name, *[f"{col_name} {short_value(c)}" for c in cols]]
    rows, bold = [], []
    for label in labels:
        row_cells = [grid.at[label, c] for c in cols]
        rows.append([str(label)] + [_seeded_cell(x, most) if isinstance(x, dict) else "–" for x in row_cells])
        bold.append([False] + [bool(best.at[label, c]) for c in cols])
    numbers = pd.DataFrame([{"row": label, col: c, "mean": x["mean"], "lo": x["lo"], "hi": x["hi"],
                             "std": x["std"], "n": x["n"], "best": bool(best.at[label, c])}
                            for label in labels for c in cols
                            if isinstance(x := grid.at[label, c], dict)])
    note = interval_note(agg, metric)
    if metric_info(metric).lower_is_better is not None and (words := resolution_words(grid, best, col_name)):
        note = f"{note}. {words}."
    return Table(kind, title, header, rows, bold, numbers, note, {"metric": metric})


def _as_metric(agg: pd.DataFrame, col: str, metric: str) -> pd.DataFrame:
    """``metric.<m>`` and its ``.std/.lo/.hi/.values`` columns renamed to ``<m>...``."""
    return agg.rename(columns={f"{col}{s}": f"{metric}{s}" for s in ("", ".std", ".lo", ".hi", ".values")})


def _sorted_rows(agg: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    keys = agg["method"].map(method_rank)
    return agg.assign(_rank=keys).sort_values(["_rank", "label", *extra], kind="stable").drop(columns="_rank")


def method_nfe_tables(df: pd.DataFrame, metrics: list[str]) -> list[Table]:
    """One table per (data, model, metric): a row per method variant, a column per NFE."""
    tables = []
    for (data, model), part in sorted(df.groupby(["data", "model"]), key=lambda g: size_key(df, g[0])):
        agg = _sorted_rows(aggregate(part, [f"metric.{m}" for m in metrics], {"nfe"}), ["nfe"])
        nfes = sorted(agg["nfe"].unique())
        for metric in (m for m in metrics if f"metric.{m}" in agg.columns):
            col = f"metric.{metric}"
            if agg[col].isna().all():
                continue
            title = f"{data} · {model} · {_metric_title(metric)} by NFE"
            t = pivot_table(_as_metric(agg, col, metric), metric,
                            "label", "nfe", nfes, "method_nfe", title, "method", "NFE")
            t.meta.update(data=data, model=model)
            tables.append(t)
    return tables


AXIS_NAMES = {"guidance": ("guidance scale", "ω"), "model": ("model size", "model"), "eval.ema": ("EMA", "EMA")}


def axis_tables(df: pd.DataFrame, metrics: list[str], axis: str, kind: str) -> list[Table]:
    """Guidance sweeps (axis ``guidance``), model-size scaling (axis ``model``) or the
    evaluation weights (axis ``eval.ema``: raw vs. post-hoc EMA) per data."""
    tables = []
    if axis not in df.columns:
        return tables
    by = ["data"] if axis == "model" else ["data", "model"]
    axes = {axis, "nfe"} | ({"model."} if axis == "model" else set())
    groups = [(g if isinstance(g, tuple) else (g,), part) for g, part in df.groupby(by)]
    for group, part in sorted(groups, key=lambda g: size_key(df, g[0]) if len(g[0]) > 1 else g[0]):
        if part[axis].nunique() < 2:
            continue
        agg = aggregate(part, [f"metric.{m}" for m in metrics] + ["sec_per_sample"], axes)
        # only variants that were actually swept over the axis
        swept = agg.groupby(["label", "nfe"])[axis].transform("nunique") > 1
        agg = agg[swept]
        if agg.empty:
            continue
        agg = _sorted_rows(agg, ["nfe"])
        agg["row"] = agg["label"] + " @ NFE " + agg["nfe"].astype(str)
        cols = (model_order(agg) if axis == "model" else ema_order(agg[axis]) if axis == "eval.ema"
                else sorted(agg[axis].unique()))
        for metric in (m for m in metrics if f"metric.{m}" in agg.columns and agg[f"metric.{m}"].notna().any()):
            col = f"metric.{metric}"
            where = " · ".join(map(str, group))
            name, short = AXIS_NAMES[axis]
            title = f"{where} · {_metric_title(metric)} by {name}"
            t = pivot_table(_as_metric(agg, col, metric), metric, "row", axis, cols, kind, title, "method @ NFE", short)
            t.meta.update(data=group[0])
            tables.append(t)
    return tables


# ----------------------------------------------------------------------------------------
# Best guidance, chosen without peeking
#
# A guided method has a best guidance scale omega; reading every method at omega = 1 is not
# a fair comparison of guided methods, and choosing omega by the very number a table reports
# overstates the winner (the choice fits that draw's noise).  The choice uses *other
# samples*: the same checkpoints evaluated with another evaluation seed (fresh noise for
# every sample, no retraining).  Sweep both at once::
#
#     python -m benchmark.run method=fm,imf,shortcut nfe=1,2 guidance=1,1.5,2,3 eval.seed=2024,7
#
# The reported evaluation seed is the suite's default (``EvalConfig.seed``); every other
# evaluation seed present is a selection seed.



def best_guidance(df: pd.DataFrame, metric: str, lower_is_better: bool) -> pd.DataFrame:
    """One row per (method variant, model, NFE) swept over guidance and evaluated at a
    selection seed: ``omega_star`` (best on the selection seeds, pooled with the training
    seeds), the reported-seed value at omega = 1 and at omega_star (``at_1``/``at_star``
    with ``.lo``/``.hi``), and ``selection_seeds``.  Empty when nothing qualifies."""
    col = f"metric.{metric}"
    if col not in df.columns or "eval.seed" not in df.columns or "guidance" not in df.columns:
        return pd.DataFrame()
    role = df["eval.seed"].astype(float).map(lambda s: "reported" if s == REPORTED_EVAL_SEED else "selection")
    if not (role == "selection").any():
        return pd.DataFrame()
    # evaluation seeds are replicates to ``aggregate``; the role column keeps the two apart
    agg = aggregate(df.assign(**{"eval.role": role}), [col], {"guidance", "nfe", "eval.role"})
    selection_seeds = sorted(df.loc[role == "selection", "eval.seed"].astype(int).unique().tolist())
    rows = []
    for (label, model, nfe), part in agg.groupby(["label", "model", "nfe"], sort=False):
        picked = part[(part["eval.role"] == "selection") & part[col].notna()]
        shown = part[part["eval.role"] == "reported"]
        if picked["guidance"].nunique() < 2:
            continue
        star = float(picked.loc[picked[col].idxmin() if lower_is_better else picked[col].idxmax(), "guidance"])
        at = {g: shown[shown["guidance"].astype(float) == g] for g in (1.0, star)}
        if any(r.empty for r in at.values()):
            continue
        row = {"method": part["method"].iloc[0], "label": label, "model": model, "nfe": nfe, "omega_star": star,
               "selection_seeds": selection_seeds}
        for g, key in ((1.0, "at_1"), (star, "at_star")):
            for suffix in ("", ".lo", ".hi"):
                row[f"{key}{suffix}"] = float(at[g][f"{col}{suffix}"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def best_guidance_tables(df: pd.DataFrame, metric: str = "") -> list[Table]:
    """Per (data, model): each guided variant at omega = 1 and at its best omega, chosen on
    the selection evaluation seeds and reported at the default one (on ``metric``, else
    the dataset's headline metric)."""
    tables, wanted = [], metric
    for (data, model), part in df.groupby(["data", "model"], sort=True):
        metric = metric_for(data, wanted, part)
        if not metric:
            continue
        lower = metric_info(metric).lower_is_better is not False
        best = best_guidance(part, metric, lower)
        if best.empty:
            continue
        best = _sorted_rows(best, ["nfe"])
        label = metric_info(metric).label
        header = ["method", "NFE", "ω*", f"{label} at ω = 1", f"{label} at ω*"]
        rows = [[r.label, str(r.nfe), f"{r.omega_star:g}", fmt_cell(r.at_1, r["at_1.lo"], r["at_1.hi"]),
                 fmt_cell(r.at_star, r["at_star.lo"], r["at_star.hi"])] for _, r in best.iterrows()]
        seeds = ", ".join(map(str, best["selection_seeds"].iloc[0]))
        note = (f"ω* is chosen on evaluation seed(s) {seeds} (the same checkpoints, fresh sample noise); both "
                f"columns are scored at the reported evaluation seed {REPORTED_EVAL_SEED}, so ω* does not fit "
                f"the reported draw. Nothing is marked best here: compare rows in the Method × NFE tables")
        tables.append(Table("best_guidance", f"{data} · {model} · best guidance scale ({label})", header, rows,
                            [[False] * len(header) for _ in rows], best.drop(columns="selection_seeds"), note,
                            {"data": data, "model": model, "metric": metric}))
    return tables


def _cost_text(value: float, axis: str) -> str:
    return f"{value:g}" if axis == "nfe_counted" else f"{value:.3g}" if axis != "sec_per_sample" else f"{value:.2e}"


def metric_for(data: str, wanted: str, part: pd.DataFrame) -> str:
    """``wanted`` (the report's ``metric=``) or the dataset's headline metric; "" when the
    rows do not hold it."""
    metric = wanted or quality_metric(data)
    col = f"metric.{metric}"
    return metric if col in part.columns and part[col].notna().any() else ""


def pareto_tables(df: pd.DataFrame, cost: str = "", metric: str = "") -> list[Table]:
    """Per dataset: every configuration's quality (``metric``, else the dataset's headline
    metric) against its cost (:func:`cost_axis`)."""
    tables, wanted = [], metric
    for data, part in df.groupby("data", sort=True):
        metric = metric_for(data, wanted, part)
        if not metric:
            continue
        col = f"metric.{metric}"
        axis = cost_axis(part, cost)
        # nfe_counted is a setting (pooled as one), the other costs are values to average
        values = list(dict.fromkeys([col, *(c for c in (axis, "sec_per_sample") if c not in config_columns(part))]))
        agg = aggregate(part, values, {"nfe", "guidance", "model", "model."})
        agg = agg[agg[col].notna()]
        agg["front"] = pareto_front(agg[axis], agg[col], metric_info(metric).lower_is_better is not False)
        agg = agg.sort_values([axis, col]).reset_index(drop=True)
        header = ["method", "model", "NFE", "counted", "ω", COST_AXES[axis], metric_info(metric).label, "front"]
        rows = [[r.label, str(r.model), str(r.nfe), f"{r.nfe_counted:g}", f"{r.guidance:g}",
                 _cost_text(r[axis], axis), fmt_cell(r[col], r[f"{col}.lo"], r[f"{col}.hi"]),
                 "✓" if r.front else ""] for _, r in agg.iterrows()]
        bold = [[bool(r.front)] * len(header) for _, r in agg.iterrows()]
        numbers = agg[["label", "model", "nfe", "nfe_counted", "guidance", *values[1:], col,
                       f"{col}.std", "n", "front"]].rename(columns={"label": "method"})
        title = f"{data} · {_metric_title(metric)} vs. {COST_AXES[axis]}"
        note = (f"sorted by {COST_AXES[axis]}; bold rows are the Pareto front (nothing is both cheaper and better)"
                + ("; measured seconds depend on the machine and its load" if axis == "sec_per_sample" else
                   "; a counted cost: the same on every machine"))
        tables.append(Table("pareto", title, header, rows, bold, numbers, note,
                            {"data": data, "metric": metric, "cost": axis}))
    return tables


def comparisons(df: pd.DataFrame, metric: str = "", cost: str = "") -> dict[str, list[Table]]:
    """Every comparison table of a selection, by kind (``method_nfe``, ``guidance``, ...)."""
    out: dict[str, list[Table]] = {k: [] for k in KINDS}
    reported = reported_rows(df)
    for data, part in reported.groupby("data", sort=True):
        metrics = [metric] if metric else list(table_metrics(data))
        # one table per varying axis: every other swept evaluation axis at its reference
        out["method_nfe"] += method_nfe_tables(at_reference(part), metrics)
        out["guidance"] += axis_tables(at_reference(part, {"guidance"}), metrics, "guidance", "guidance")
        out["model_size"] += axis_tables(at_reference(part), metrics, "model", "model_size")
        out["ema"] += axis_tables(at_reference(part, {"eval.ema"}), metrics, "eval.ema", "ema")
    out["best_guidance"] = best_guidance_tables(at_reference(df, {"guidance"}), metric)
    # guidance changes the cost (CFG doubles the passes): a point of the front, not a variant
    out["pareto"] = pareto_tables(at_reference(reported, {"guidance"}), cost, metric)
    return out


# ----------------------------------------------------------------------------------------
# Writing the files

HTML_STYLE = ("body{font-family:sans-serif;margin:2em}table.comparison{border-collapse:collapse;margin:1em 0}"
              "caption{font-weight:bold;text-align:left;padding:.3em 0}"
              "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
              "td:first-child,th:first-child{text-align:left}td.best{background:#e6f4e6}.note{color:#555}")


def write_tables(tables: dict[str, list[Table]], out: Path) -> list[Path]:
    """``<kind>.md/.csv/.tex/.html`` per kind with content; stale files of empty kinds removed."""
    written = []
    for kind, items in tables.items():
        paths = {ext: out / f"{kind}.{ext}" for ext in ("md", "csv", "tex", "html")}
        if not items:
            for path in paths.values():
                path.unlink(missing_ok=True)
            continue
        md = [f"# {KINDS[kind]}", ""] + [f"## {t.title}\n\n{t.to_markdown()}\n\n{t.note}\n" for t in items]
        tex = [t.to_latex() for t in items]
        body = "".join(f"{t.to_html()}" for t in items)
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{KINDS[kind]}</title>"
                f"<style>{HTML_STYLE}</style></head><body><h1>{KINDS[kind]}</h1>{body}</body></html>")
        numbers = pd.concat([t.numbers.assign(table=t.title) for t in items], ignore_index=True)
        atomic_write_bytes(paths["md"], "\n".join(md).encode())
        atomic_write_bytes(paths["tex"], ("% generated by python -m benchmark.report; needs \\usepackage{booktabs}\n"
                                          + "\n\n".join(tex) + "\n").encode())
        atomic_write_bytes(paths["html"], page.encode())
        atomic_write_bytes(paths["csv"], numbers.to_csv(index=False).encode())
        written += paths.values()
    return written


def floor_lines(selection: pd.DataFrame) -> list[str]:
    """One line per floor the selection records (digits: FD∞ and KID of the 297 held-out test
    images against the train split, measured like every row), with its 95% interval."""
    lines = []
    for metric, floor in FLOORS.items():
        col = f"metric.{floor}"
        if col in selection.columns and selection[col].notna().any():
            row = selection[selection[col].notna()].iloc[0]
            interval = (f" [{fmt(row[col + '_lo'])}, {fmt(row[col + '_hi'])}]"
                        if f"{col}_lo" in selection.columns else "")
            lines.append(f"{metric_info(floor).label}: {fmt(row[col])}{interval} (held-out test images "
                         f"against the same reference: what a perfect generator scores on {metric_info(metric).label})")
    return lines


def write_summary(tables: dict[str, list[Table]], plots: list[Path], out: Path, floors: list[str]) -> Path:
    """``report.md``: the headline tables and every plot, ready to paste into a README."""
    lines = ["# Benchmark report", "", "Generated by `python -m benchmark.report`; do not edit by hand.", ""]
    for items in tables.values():
        for t in items:
            lines += [f"## {t.title}", "", t.to_markdown(), "", t.note, ""]
    for line in floors:
        lines += [line, ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    if plots:
        lines += ["", f"Each figure is also in vector form for papers: `plots/<name>.pdf` and `plots/<name>.svg`; "
                      f"the PNGs are {plots_dpi()} dpi."]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


README_BLOCK_METRICS = ("class_acc", "memorized")
"""Shown in a README block beside each dataset's quality metric."""


def readme_block(tables: dict[str, list[Table]], floors: list[str], command: str, metric: str = "") -> str:
    """The Markdown a README block holds: each dataset's quality-metric (``metric``, else the
    headline) and class-accuracy / memorisation tables by NFE, its quality metric over
    guidance where swept, the best-guidance tables, the floors, and the command."""
    parts = [f"<!-- generated by `{command}`; do not edit by hand -->", ""]
    for t in tables["method_nfe"]:
        if t.meta["metric"] in (metric or quality_metric(t.meta["data"]), *README_BLOCK_METRICS):
            parts += [f"**{t.title}**", "", t.to_markdown(), "", f"_{t.note}_", ""]
    for t in tables["guidance"]:
        if t.meta["metric"] == (metric or quality_metric(t.meta["data"])):
            parts += [f"**{t.title}**", "", t.to_markdown(), "", f"_{t.note}_", ""]
    for t in tables["best_guidance"]:
        parts += [f"**{t.title}**", "", t.to_markdown(), "", f"_{t.note}_", ""]
    parts += [f"_{line}_" for line in floors]
    return "\n".join(parts).rstrip() + "\n"


def update_readme(readme: Path, name: str, text: str) -> Path:
    """Replace what lies between ``<!-- report:NAME begin -->`` and ``<!-- report:NAME end -->``
    in ``readme`` with ``text`` (atomically)."""
    begin, end = f"<!-- report:{name} begin -->", f"<!-- report:{name} end -->"
    content = readme.read_text()
    if content.count(begin) != 1 or content.count(end) != 1 or content.index(begin) > content.index(end):
        raise UserError(f"readme={name}: {readme} needs exactly one '{begin}' line followed by one '{end}' "
                        f"line where the tables go; add them and rerun")
    head, rest = content.split(begin)
    _, tail = rest.split(end)
    atomic_write_bytes(readme, f"{head}{begin}\n{text}{end}{tail}".encode())
    return readme


# ----------------------------------------------------------------------------------------
# The report notebook


# JupyterLab's look without the scripts it would fetch from a CDN (require.js, MathJax,
# mermaid): the report needs none of them, and the HTML must open offline, in full.
SELF_CONTAINED_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def html_exporter():
    """nbconvert's HTML exporter: outputs only (no code), images inline, no remote scripts."""
    import jinja2
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab", template_file="self_contained.html.j2",
                        extra_loaders=[jinja2.DictLoader({"self_contained.html.j2": SELF_CONTAINED_TEMPLATE})],
                        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                        embed_images=True)


def execute_notebook(source: Path, target_dir: Path, parameters: dict, cwd: Path) -> tuple[Path, Path]:
    """Run a jupytext percent script headless (nbclient) with ``parameters`` injected after
    its ``parameters`` cell; write the executed ``.ipynb`` and a self-contained ``.html``."""
    try:
        import jupytext
        import nbconvert  # noqa: F401  (checked here, used by html_exporter)
        import nbformat
        from jupyter_client.kernelspec import NoSuchKernel
        from jupyter_client.manager import KernelManager
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError as err:
        raise UserError(f"the report notebook needs {err.name}, which is not installed; expected the "
                        f"reports extra: pip install -e '.[reports]' (or pass --no-notebook)") from None
    try:  # nbconvert looks for its 'lab' template here, before the kernel runs
        exporter = html_exporter()
    except ValueError as err:  # nbconvert's data files (share/jupyter/nbconvert/templates) are missing
        raise UserError(f"nbconvert cannot find its 'lab' HTML template ({str(err).splitlines()[0]}); expected "
                        f"nbconvert's data files in this environment: reinstall it here (pip install "
                        f"--force-reinstall nbconvert), or pass --no-notebook") from None
    nb = jupytext.read(source)
    code = "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(code, metadata={"tags": ["injected-parameters"]})
    at = next((i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), 0)
    nb.cells.insert(at, cell)
    stem = target_dir / source.stem
    try:
        with tempfile.TemporaryDirectory(prefix="report-kernel-") as sockets:
            # IPC sockets in a private folder: the kernel listens on no TCP port at all
            km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(sockets) / "kernel"))
            try:
                NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
            finally:  # a kernel manager we pass in is ours to shut down
                if km.has_kernel:
                    km.shutdown_kernel(now=True)
    except NoSuchKernel:
        raise UserError("no Jupyter kernel 'python3'; expected ipykernel: pip install -e '.[reports]' "
                        "and python -m ipykernel install --user (or pass --no-notebook)") from None
    except CellExecutionError as err:
        atomic_write_bytes(stem.with_suffix(".ipynb"), nbformat.writes(nb).encode())
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise Failure(f"the report notebook failed ({last}); the partial notebook is "
                           f"{stem.with_suffix('.ipynb')}") from None
    atomic_write_bytes(stem.with_suffix(".ipynb"), nbformat.writes(nb).encode())
    body, _ = exporter.from_notebook_node(nb)
    atomic_write_bytes(stem.with_suffix(".html"), body.encode())
    return stem.with_suffix(".ipynb"), stem.with_suffix(".html")


# ----------------------------------------------------------------------------------------
# Command line


@dataclass
class Options:
    results_dir: Path = Path("results")
    out: Path | None = None
    notebook_dir: Path | None = None  # default: out
    metric: str = ""
    cost: str = ""
    notebook: bool = True
    publish: bool = False  # copy the summary and plots into reports/ (tracked) for the README
    readme: str = ""  # a README block to regenerate with the headline tables (README.md markers)
    argv: list[str] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Options:
    opts = Options()
    for arg in argv:
        if arg.startswith("-"):
            if arg not in ("--no-notebook", "--publish"):
                raise UserError(f"unknown flag {arg}; expected --no-notebook, --publish or --help")
            opts.notebook = opts.notebook and arg != "--no-notebook"
            opts.publish = opts.publish or arg == "--publish"
            continue
        key, _, value = arg.partition("=")
        if key in OPTIONS:
            if not value:
                raise UserError(f"{key}= needs a value; expected e.g. {key}=results")
            setattr(opts, key, value if key in ("metric", "cost", "readme") else Path(value))
        else:
            opts.filters.append(arg)
    if (opts.publish or opts.readme) and not CHECKOUT:
        flag = "--publish" if opts.publish else f"readme={opts.readme}"
        raise UserError(f"{flag} rewrites the repository's reports/ and README.md, but this benchmark is "
                        f"installed from a wheel ({REPO}); expected a checkout: run it from a clone "
                        f"(pip install -e .), or drop {flag}")
    opts.out = opts.out or opts.results_dir / "report"
    opts.notebook_dir = opts.notebook_dir or opts.out
    opts.argv = list(argv)
    return opts


def help_text() -> str:
    return "\n".join([
        USAGE, "", "Rebuild the results table and write comparison tables, plots and the report notebook.", "",
        "filters: column=value[,value...] keeps rows whose column holds one of the values, e.g.",
        "  method=fm,imf  data=digits  model=dit-tiny  nfe=1,2  guidance=1  seed=0  train.steps=3000", "",
        "options:",
        "  results_dir=DIR   where the runs are (default results/)",
        "  out=DIR           where tables and plots go (default <results_dir>/report)",
        "  notebook_dir=DIR  where the executed notebook and its HTML go (default: out)",
        "  metric=NAME       tabulate only this metric (fd, kid, class_acc, swd, mmd, ...)",
        "  cost=AXIS         the cost axis of the Pareto table and plot: " + ", ".join(COST_AXES),
        "                    (default: sampling FLOPs; measured seconds only when asked)",
        "  --no-notebook     skip executing reports/benchmark_report.py",
        "  --publish         also copy the summary and plots to reports/benchmark_report.md and",
        "                    reports/benchmark_report_figures/ (tracked: what the README shows)",
        "  readme=NAME       regenerate README.md's block between <!-- report:NAME begin/end -->",
        "                    with the headline tables of this selection and the command", "",
        "example: python -m benchmark.report data=digits method=fm,meanflow,imf"])


def run(opts: Options) -> dict:
    """Everything ``main`` does, returning what was written (for tests and the notebook)."""
    from benchmark import plots

    if not any(Path(opts.results_dir).glob("runs/*/evals/*.json")):
        raise UserError(f"no evaluation records under {opts.results_dir}/runs, so the results table would be "
                        f"empty; expected some: run e.g. python -m benchmark.run method=fm nfe=1,2 "
                        f"results_dir={opts.results_dir} first")
    table_path = rebuild(opts.results_dir)
    df = read_table(table_path)
    filters = parse_filters(opts.filters, df)
    selection = select(df, filters)
    if opts.metric and f"metric.{opts.metric}" not in selection.columns:
        held = sorted(c.removeprefix("metric.") for c in selection.columns if c.startswith("metric."))
        raise UserError(f"metric={opts.metric} is not in the selected records; expected one of {', '.join(held)}")
    out = Path(opts.out)
    atomic_write_bytes(out / "selection.csv", selection.to_csv(index=False).encode())
    tables = comparisons(selection, opts.metric, opts.cost)
    written = write_tables(tables, out)
    curves = read_table(table_path.parent / "curves.parquet")
    figures = plots.write_plots(selection, curves, opts.results_dir, out / "plots", opts.metric, opts.cost)
    summary = write_summary(tables, figures, out, floor_lines(selection))
    result = {"table": table_path, "rows": len(selection), "tables": written, "plots": figures, "summary": summary}
    if opts.notebook:
        params = {"table": str(table_path.resolve()), "filters": filters, "metric": opts.metric,
                  "cost": opts.cost}
        result["notebook"], result["html"] = execute_notebook(NOTEBOOK_SOURCE, Path(opts.notebook_dir), params,
                                                                REPO if CHECKOUT else Path.cwd())
    if opts.publish:
        result["published"] = publish(summary, figures, REPO / "reports")
    if opts.readme:
        command = " ".join(["python -m benchmark.report", *opts.argv])
        result["readme"] = update_readme(REPO / "README.md", opts.readme,
                                         readme_block(tables, floor_lines(selection), command, opts.metric))
    return result


def plots_dpi() -> int:
    from benchmark.plots import DPI

    return DPI


def publish(summary: Path, figures: list[Path], target: Path) -> Path:
    """Copy the summary and its plots into ``target`` (``reports/``, tracked), where the
    README shows them: ``benchmark_report.md`` and ``benchmark_report_figures/*.png`` with
    their ``.pdf`` and ``.svg`` twins.  Only with ``--publish``: a plain report run writes
    nothing outside the results folder."""
    folder = target / "benchmark_report_figures"
    copies = [p.with_suffix(ext) for p in figures for ext in (".png", ".pdf", ".svg")]
    for path in (p for p in copies if p.is_file()):
        atomic_write_bytes(folder / path.name, path.read_bytes())
    for stale in {p for ext in ("png", "pdf", "svg") for p in folder.glob(f"*.{ext}")} - {folder / p.name for p in copies}:
        stale.unlink()
    text = summary.read_text().replace("](plots/", f"]({folder.name}/")
    atomic_write_bytes(target / "benchmark_report.md", text.encode())
    return target / "benchmark_report.md"


def main(argv: list[str] | None = None) -> int:
    return entry(_main, argv, help_text)


def _main(argv: list[str]) -> int:
    result = run(parse_args(argv))
    counts = {k: 0 for k in KINDS}
    for path in result["tables"]:
        counts[path.stem] += path.suffix == ".md"
    print(f"{result['rows']} evaluation(s) from {result['table']}")
    print(f"tables: {', '.join(k for k, v in counts.items() if v) or 'none'} -> {result['summary'].parent} "
          f"(.md .csv .tex .html); summary {result['summary']}")
    print(f"plots: {len(result['plots'])} -> {result['summary'].parent / 'plots'}")
    if "html" in result:
        print(f"notebook: {result['notebook']}; html: {result['html']}")
    if "published" in result:
        print(f"published for the README: {result['published']} and its figures")
    if "readme" in result:
        print(f"README block regenerated in {result['readme']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
