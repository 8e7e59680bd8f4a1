"""Seaborn figures of a results-table selection: quality against NFE, guidance, model size
and sampling cost, training curves, and sample grids side by side.

Every function takes rows of the long-format table (``benchmark.table``) and returns a
matplotlib figure (or ``None`` when the selection has nothing to show on that axis), so the
report command and the report notebook draw the same pictures.  Error bars are the standard
deviation over seeds where seeds repeat.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs in CI and over SSH
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FixedLocator,
    FuncFormatter,
    LogLocator,
    NullFormatter,
    NullLocator,
    ScalarFormatter,
)

from benchmark.compare import (  # noqa: E402
    aggregate,
    at_unit_guidance,
    cost_axis,
    method_rank,
    model_order,
    pareto_front,
    reported_rows,
    variant_labels,
)
from benchmark.store import atomic_write_bytes  # noqa: E402
from benchmark.table import COST_AXES, metric_info, quality_metric  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def _labelled(df: pd.DataFrame, axes: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """Rows whose ``method`` column names the method variant (the method and what varies
    besides ``axes``; the bare name stays in ``method_name``), and the variants in method
    order: the legend order of every plot."""
    df = df.assign(method_name=df["method"], method=variant_labels(df, axes))
    firsts = df.drop_duplicates("method").set_index("method")["method_name"]
    return df, sorted(firsts.index, key=lambda v: (method_rank(firsts[v]), v))


def _legend(ax) -> None:
    """Outside the axes, where it never hides a point."""
    ax.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")


def _plain_y(ax) -> None:
    """No '+4.72e1' offset on the y axis: tiny differences read as the values they are."""
    formatter = ax.yaxis.get_major_formatter()
    if isinstance(formatter, ScalarFormatter):
        formatter.set_useOffset(False)


def _ylabel(metric: str) -> str:
    info = metric_info(metric)
    arrow = {True: " (lower is better)", False: " (higher is better)"}.get(info.lower_is_better, "")
    return info.label + arrow


def _log2_x(ax, values) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({float(v) for v in values})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())


def quality_vs_nfe(df: pd.DataFrame, metric: str) -> Figure | None:
    """One line per method variant, log-2 NFE axis; one panel per model size."""
    col = f"metric.{metric}"
    if col not in df.columns or df[col].isna().all():
        return None
    df, order = _labelled(df, {"nfe", "model", "model."})
    models = model_order(df)
    grid = sns.relplot(df, x="nfe", y=col, hue="method", hue_order=order, col="model", col_order=models,
                       kind="line", marker="o", errorbar="sd", err_style="bars", height=3.6, aspect=1.3,
                       facet_kws={"sharey": False})
    for ax in grid.axes.flat:
        _log2_x(ax, df["nfe"])
        _plain_y(ax)
    grid.set_axis_labels("NFE (sampling steps, log scale)", _ylabel(metric))
    grid.figure.suptitle(f"{df['data'].iloc[0]}: {metric_info(metric).label} vs NFE", y=1.03)
    return grid.figure


def quality_vs_guidance(df: pd.DataFrame, metric: str) -> Figure | None:
    """Quality against guidance scale, a line per method variant, a panel per NFE."""
    col = f"metric.{metric}"
    if df["guidance"].nunique() < 2 or col not in df.columns:
        return None
    df, order = _labelled(df, {"guidance", "nfe"})
    swept = df.groupby(["method", "nfe", "model"])["guidance"].transform("nunique") > 1
    df = df[swept]
    if df.empty:
        return None
    grid = sns.relplot(df, x="guidance", y=col, hue="method", hue_order=[o for o in order if o in set(df["method"])],
                       col="nfe", style="model", kind="line", marker="o", errorbar="sd", err_style="bars",
                       height=3.4, aspect=1.2, col_wrap=min(4, df["nfe"].nunique()))
    grid.set_axis_labels("guidance scale ω", _ylabel(metric))
    grid.set_titles("NFE {col_name}")
    for ax in grid.axes.flat:
        _plain_y(ax)
    grid.figure.suptitle(f"{df['data'].iloc[0]}: {metric_info(metric).label} vs guidance", y=1.03)
    return grid.figure


def quality_vs_model_size(df: pd.DataFrame, metric: str) -> Figure | None:
    """Quality against model size (small to large), a line per method variant, style per NFE."""
    col = f"metric.{metric}"
    if df["model"].nunique() < 2 or col not in df.columns:
        return None
    df, order = _labelled(df, {"model", "model.", "nfe"})
    models = model_order(df)
    df = df.assign(size=df["model"].map({m: i for i, m in enumerate(models)}), NFE=df["nfe"].astype(str))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(df, x="size", y=col, hue="method", hue_order=order, style="NFE", marker="o", errorbar="sd",
                 err_style="bars", ax=ax)
    ax.set_xticks(range(len(models)), models)
    ax.set(xlabel="model size", ylabel=_ylabel(metric), title=f"{df['data'].iloc[0]}: scaling")
    _plain_y(ax)
    _legend(ax)
    return fig


def quality_vs_cost(df: pd.DataFrame, metric: str, cost: str = "") -> Figure | None:
    """Quality against a cost axis (log-x; counted sampling FLOPs by default, see
    :func:`benchmark.report.cost_axis`), the Pareto front as a step line."""
    col = f"metric.{metric}"
    if col not in df.columns or df[col].isna().all():
        return None
    axis = cost_axis(df, cost)
    values = [col] + ([axis] if axis != "nfe_counted" else [])  # nfe_counted is a setting, not a value
    agg = aggregate(df, values, {"nfe", "guidance", "model", "model."}).dropna(subset=[col])
    agg["front"] = pareto_front(agg[axis], agg[col], metric_info(metric).lower_is_better is not False)
    agg = agg.assign(method_name=agg["method"], method=agg["label"])
    firsts = agg.drop_duplicates("method").set_index("method")["method_name"]
    order = sorted(firsts.index, key=lambda v: (method_rank(firsts[v]), v))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.scatterplot(agg, x=axis, y=col, hue="method", hue_order=order, style="model", s=60, ax=ax)
    front = agg[agg["front"]].sort_values(axis)
    ax.step(front[axis], front[col], where="post", color="0.3", lw=1, ls="--", label="Pareto front")
    for _, r in agg.iterrows():
        ax.annotate(f"{r.nfe}", (r[axis], r[col]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    if axis == "nfe_counted":
        _log2_x(ax, agg[axis])
    else:  # 1-2-5 ticks labelled like 2e-04: a sweep often spans less than one decade
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=f"{COST_AXES[axis]} (log scale; labels: NFE)", ylabel=_ylabel(metric),
           title=f"{df['data'].iloc[0]}: quality vs {COST_AXES[axis].split(' per ')[0]}")
    _plain_y(ax)
    _legend(ax)
    return fig


def training_curves(df: pd.DataFrame, curves: pd.DataFrame) -> Figure | None:
    """Training loss against step for each training in the selection (one line per run)."""
    curves = curves[curves["train_key"].isin(set(df["train_key"]))]
    if curves.empty:
        return None
    df, order = _labelled(df, {"nfe", "guidance", "eval.", "nfe_counted"})
    variant = df.drop_duplicates("train_key").set_index("train_key")["method"]
    curves = curves.assign(method=curves["train_key"].map(variant), seed=curves["seed"].astype(str))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(curves, x="step", y="loss", hue="method", hue_order=[o for o in order if o in set(variant)],
                 style="seed", units="train_key", estimator=None, marker="o", markersize=5, ax=ax)
    loss = curves["loss"]
    if (loss > 0).all() and loss.max() / loss.min() > 20:  # log only where it helps reading
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="training loss (each method's own objective)",
           title=f"{df['data'].iloc[0]}: training curves")
    _legend(ax)
    return fig


def sample_grids(df: pd.DataFrame, results_dir: Path) -> Figure | None:
    """Sample grids side by side for one model size: a row per method variant, a column per
    NFE (first seed; guidance 1 where evaluated, else the scale nearest to it)."""
    df = df[df["grid"].notna()]
    if df.empty:
        return None
    df, order = _labelled(df, {"nfe", "guidance", "nfe_counted"})
    df = df.assign(_off=(df["guidance"] - 1).abs()).sort_values(["seed", "_off"], kind="stable")
    picks = df.drop_duplicates(["method", "nfe"])
    nfes = sorted(picks["nfe"].unique())
    fig, axes = plt.subplots(len(order), len(nfes), figsize=(2.2 * len(nfes) + 1.5, 2.2 * len(order)),
                             squeeze=False)
    for i, variant in enumerate(order):
        for j, nfe in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            hit = picks[(picks["method"] == variant) & (picks["nfe"] == nfe)]
            path = Path(results_dir) / str(hit["grid"].iloc[0]) if len(hit) else None
            if path is not None and path.is_file():
                ax.imshow(plt.imread(path), cmap="gray", interpolation="nearest")
            else:
                ax.set_facecolor("0.95")
            if i == 0:
                ax.set_title(f"NFE {nfe}")
            if j == 0:
                ax.set_ylabel(variant, fontsize=9)
    fig.suptitle(f"{df['data'].iloc[0]} · {df['model'].iloc[0]}: samples", y=1.0)
    fig.tight_layout()
    return fig


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def figures(df: pd.DataFrame, curves: pd.DataFrame, results_dir: Path, metric: str = "",
            cost: str = "") -> dict[str, Figure]:
    """Every figure of a selection, named ``<metric>_vs_nfe__<data>`` and so on."""
    out: dict[str, Figure | None] = {}
    for data, part in reported_rows(df).groupby("data", sort=True):
        m = metric or quality_metric(data)
        out[f"{m}_vs_nfe__{data}"] = quality_vs_nfe(at_unit_guidance(part), m)
        out[f"{m}_vs_guidance__{data}"] = quality_vs_guidance(part, m)
        out[f"{m}_vs_model_size__{data}"] = quality_vs_model_size(part, m)
        out[f"{m}_vs_cost__{data}"] = quality_vs_cost(part, m, cost)
        out[f"training_curves__{data}"] = training_curves(part, curves)
        for model in model_order(part):
            out[f"samples__{data}__{model}"] = sample_grids(part[part["model"] == model], results_dir)
    return {k: v for k, v in out.items() if v is not None}


def write_plots(df: pd.DataFrame, curves: pd.DataFrame, results_dir: Path, out: Path, metric: str = "",
                cost: str = "") -> list[Path]:
    """Save every figure as ``out/<name>.png`` (atomically); stale PNGs in ``out`` are removed."""
    written = []
    for name, fig in figures(df, curves, results_dir, metric, cost).items():
        path = out / f"{name}.png"
        atomic_write_bytes(path, figure_png(fig))
        written.append(path)
    for stale in set(out.glob("*.png")) - set(written):
        stale.unlink()
    return written
