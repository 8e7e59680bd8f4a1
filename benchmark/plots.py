"""Paper-ready figures of a results-table selection: quality against NFE, guidance, model size
and sampling cost, training curves, and sample grids side by side.

Every function takes rows of the long-format table (``benchmark.table``) and returns a
matplotlib figure (or ``None`` when the selection has nothing to show on that axis), so the
report command and the report notebook draw the same pictures.  Conventions of every plot:

- **short legends**: one colour per method variant, labelled with the method name plus only
  the settings that vary between that method's plotted rows (short names: ``omega=2``, not
  ``method.omega=2``); the settings every series shares (model, steps, guidance, EMA, seeds)
  are said once, in a caption under the figure;
- **EMA vs raw weights as line style**: solid lines and filled markers are post-hoc EMA
  weights (``eval.ema`` = a sigma_rel; several sigma_rel get dash-dot, dotted), dashed lines
  and hollow markers the raw weights; where the selection holds one setting, the caption
  names it;
- **log axes where values span more than a decade**, decided per value axis from the data
  (every point and its interval), linear otherwise;
- **the real-data floor** of the metric (held-out real images scored like a generator,
  ``metric.fd_floor`` / ``metric.kid_floor``) as a dotted horizontal line labelled as such;
- points are the mean over seeds with the tables' 95% interval as error bars (Student's t
  over seeds, else the evaluation's bootstrap interval), so plots and tables agree;
- every figure is written as PNG (``DPI`` = 200) beside vector PDF and SVG (text kept as
  text, so it stays editable and searchable).
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs in CI and over SSH
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    EngFormatter,
    FixedLocator,
    FuncFormatter,
    LogLocator,
    NullFormatter,
    NullLocator,
    ScalarFormatter,
)

from benchmark.compare import (  # noqa: E402
    aggregate,
    at_reference,
    configurations,
    cost_axis,
    ema_order,
    ema_text,
    method_rank,
    model_order,
    pareto_front,
    reported_rows,
    short_value,
    variant_labels,
)
from benchmark.store import atomic_write_bytes  # noqa: E402
from benchmark.table import COST_AXES, FLOORS, metric_info, quality_metric  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")

DPI = 200
"""Resolution of every PNG (recorded in its pHYs chunk); PDF and SVG are vector."""
FORMATS = ("png", "pdf", "svg")
LABEL_WIDTH = 34
"""A legend label longer than this wraps onto further lines (at a comma)."""
SAVE_RC = {"svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "fewstep-bench"}
"""Text stays text in SVG and TrueType in PDF (editable in a paper's figure tools); a fixed
SVG id salt keeps the files byte-stable between runs."""
FIELD_NAMES = {"guidance": "ω", "train.steps": "steps", "eval.num_samples": "samples", "eval.ema": "EMA"}
"""Short names of settings in legends and captions; any other ``group.field`` shows as ``field``."""
CAPTION_FIELDS = {"model": "{}", "train.steps": "{} steps", "guidance": "ω = {}", "eval.ema": "{}",
                  "eval.num_samples": "{} samples/evaluation"}
"""Settings the caption names (and how) when every plotted series shares them."""


# ----------------------------------------------------------------------------------------
# Labels, captions, styles


def field_name(column: str) -> str:
    return FIELD_NAMES.get(column, column.split(".", 1)[-1])


def _wrap(label: str) -> str:
    """``method (a=1, b=2, ...)`` on several lines when it is long (legends stay narrow)."""
    if len(label) <= LABEL_WIDTH:
        return label
    return "\n".join(textwrap.wrap(label, LABEL_WIDTH, break_long_words=False, subsequent_indent="  "))


def _series(df: pd.DataFrame, axes: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """Rows with ``series`` (the method variant's short label; the EMA setting is a line
    style, never part of it) and ``_ema``, and the series in method order."""
    labels = variant_labels(df, axes | {"eval.ema"}, name=field_name).map(_wrap)
    ema = df["eval.ema"].astype(str) if "eval.ema" in df.columns else pd.Series("", index=df.index)
    df = df.assign(series=labels, _ema=ema)
    firsts = df.drop_duplicates("series").set_index("series")["method"]
    return df, sorted(firsts.index, key=lambda v: (method_rank(firsts[v]), v))


def caption(df: pd.DataFrame, skip: set[str] = frozenset(), seeds: bool = True) -> str:
    """What every plotted series shares, said once: ``model dit-tiny · steps 3000 · ...``,
    and (``seeds``) what a point and its error bar are."""
    parts = []
    for col, form in CAPTION_FIELDS.items():
        if col in skip or col not in df.columns:
            continue
        values = df[col].dropna().astype(str).unique()
        if len(values) == 1:
            value = ema_text(values[0]) if col == "eval.ema" else short_value(df[col].dropna().iloc[0])
            parts.append(form.format(value))
    sizes = configurations(df).value_counts()  # seeds per plotted point
    n, fewest = (int(sizes.max()), int(sizes.min())) if len(sizes) else (1, 1)
    if seeds:
        parts.append(f"mean of {n} seeds ± 95% interval (Student's t)" if n > 1 else "1 seed ± 95% bootstrap interval")
        if n > 1 and fewest == 1:
            parts.append("1-seed points: their bootstrap interval")
    return " · ".join(parts)


def _palette(order: list[str]) -> dict[str, tuple]:
    colours = sns.color_palette("deep" if len(order) <= 10 else "husl", len(order))
    return dict(zip(order, colours))


def _ema_styles(values) -> dict[str, dict]:
    """Line style per EMA setting: raw weights dashed with hollow markers; sigma_rel solid
    (then dash-dot, dotted for further sigma_rel) with filled markers."""
    styles, sigma = {}, iter(["-", "-.", ":", (0, (5, 1, 1, 1))])
    for v in ema_order(values):
        styles[v] = ({"ls": "--", "mfc": "white"} if v == "raw" else {"ls": next(sigma, "-"), "mfc": None})
    return styles


def _legend(fig: Figure, order: list[str], palette: dict, styles: dict, extra: list | None = None,
            marker: str = "o", line: bool = True, dashes: dict | None = None) -> None:
    """One entry per series (colour; its line style from ``dashes`` when given), one per EMA
    setting when several (line style), then ``extra`` handles; outside the axes, where it
    never hides a point."""
    dashes = dashes or {}
    handles = [Line2D([], [], color=palette[s], marker=marker, ms=5, lw=1.8,
                      ls=dashes.get(s, "-") if line else "none", label=s) for s in order]
    if len(styles) > 1:
        handles += [Line2D([], [], color="0.3", marker=marker, ms=5, lw=1.5, ls=st["ls"],
                           mfc=st["mfc"] or "0.3", label=ema_text(e)) for e, st in styles.items()]
    handles += extra or []
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)


def legend_texts(fig: Figure) -> list[str]:
    """Every legend entry of a figure (for checks: count and length)."""
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def _finish(fig: Figure, title: str, note: str) -> Figure:
    """Title above, the shared-settings caption below, both inside the figure's layout (a
    caption wider than the figure wraps: the tight bounding box must not grow past the legend)."""
    fig.suptitle(title, fontsize="large", x=0.01, ha="left")  # left: the legend holds the top right
    width = int(fig.get_figwidth() * 72 / (0.55 * 10))  # characters of 10 pt text across the figure
    lines = [""]
    for part in note.split(" · "):
        joined = f"{lines[-1]} · {part}" if lines[-1] else part
        lines[-1:] = [joined] if len(joined) <= width or not lines[-1] else [lines[-1], part]
    fig.supxlabel("\n".join(lines), fontsize="small", color="0.3")
    return fig


# ----------------------------------------------------------------------------------------
# Axes


def spans_decades(values) -> bool:
    """True where positive values span more than a factor 10 (a log axis reads them)."""
    v = np.asarray([float(x) for x in values if x is not None and np.isfinite(float(x))])
    return len(v) > 1 and bool((v > 0).all()) and v.max() / v.min() > 10


def _log_ticks(axis, fmt=None) -> None:
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(fmt or FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(LogLocator(base=10, subs="auto"))
    axis.set_minor_formatter(NullFormatter())


def _value_y(ax, values) -> None:
    """Log where the values span more than a decade, else linear without an offset."""
    if spans_decades(values):
        ax.set_yscale("log")
        _log_ticks(ax.yaxis)
    else:
        formatter = ax.yaxis.get_major_formatter()
        if isinstance(formatter, ScalarFormatter):  # no '+4.72e1' offset: values read as they are
            formatter.set_useOffset(False)


def _steps_x(ax, values) -> None:
    """A tick at every swept value (NFE, omega); log-2 spacing where they span a decade."""
    ticks = sorted({float(v) for v in values})
    if spans_decades(ticks):
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def _ylabel(metric: str) -> str:
    info = metric_info(metric)
    arrow = {True: " (lower is better)", False: " (higher is better)"}.get(info.lower_is_better, "")
    return info.label + arrow


def floor_value(df: pd.DataFrame, metric: str) -> float | None:
    """The real-data floor the selection records for ``metric`` (None if none)."""
    col = f"metric.{FLOORS[metric]}" if metric in FLOORS else ""
    if col not in df.columns or df[col].notna().sum() == 0:
        return None
    return float(df[col].dropna().iloc[0])


def _floor(ax, floor: float | None, log: bool) -> None:
    if floor is None or (log and floor <= 0):
        return
    ax.axhline(floor, color="0.25", ls=(0, (1, 1.5)), lw=1.3, zorder=1)
    ax.annotate(f"real-data floor {floor:.3g}", xy=(0.99, floor), xycoords=("axes fraction", "data"),
                ha="right", va="bottom", fontsize="x-small", color="0.25")


def _interval(pts: pd.DataFrame, col: str) -> np.ndarray:
    """Error bar lengths below and above each mean (0 where there is no interval)."""
    lo = (pts[col] - pts[f"{col}.lo"]).clip(lower=0).fillna(0)
    hi = (pts[f"{col}.hi"] - pts[col]).clip(lower=0).fillna(0)
    return np.vstack([lo.to_numpy(float), hi.to_numpy(float)])


def _span(pts: pd.DataFrame, col: str) -> list[float]:
    """The values that decide a y axis: means and interval ends above zero.  Not the floor:
    a floor far below the points would turn a linear axis log and leave the points squeezed
    at its top; it is drawn either way (the axis extends to it)."""
    return list(pts[col]) + [v for v in pts[f"{col}.hi"] if v > 0] + [v for v in pts[f"{col}.lo"] if v > 0]


def _points(df: pd.DataFrame, metric: str, axes: set[str]) -> tuple[pd.DataFrame, list[str]] | None:
    """One row per configuration and EMA setting (seeds pooled), with its series label."""
    col = f"metric.{metric}"
    if col not in df.columns or df[col].isna().all():
        return None
    agg = aggregate(df, [col], axes).dropna(subset=[col])
    return _series(agg, axes) if not agg.empty else None


def _draw(ax, pts: pd.DataFrame, x: str, col: str, palette: dict, styles: dict, xmap=None) -> None:
    for (series, ema), line in pts.groupby(["series", "_ema"], sort=False):
        line = line.assign(_x=line[x].map(xmap) if xmap else line[x]).sort_values("_x")
        xs = line["_x"]
        style = styles[ema]
        ax.errorbar(xs, line[col], yerr=_interval(line, col), color=palette[series], ls=style["ls"], marker="o",
                    ms=5, mfc=style["mfc"] or palette[series], lw=1.8, capsize=2.5, elinewidth=1)


def _panels(n: int, width: float = 4.2, height: float = 3.3, wrap: int = 3):
    cols = min(n, wrap)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 2.2, height * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _line_figure(df: pd.DataFrame, metric: str, x: str, panel: str, axes: set[str], xlabel: str, title: str,
                 panel_title, xmap=None, xticks=None) -> Figure | None:
    """Metric against ``x``, a line per (series, EMA setting), a panel per value of ``panel``."""
    got = _points(df, metric, axes | {panel})
    if got is None:
        return None
    pts, order = got
    col = f"metric.{metric}"
    panels = model_order(pts) if panel == "model" else sorted(pts[panel].unique())
    palette, styles = _palette(order), _ema_styles(pts["_ema"])
    floor = floor_value(df, metric)
    fig, axs = _panels(len(panels))
    shared_y = _span(pts, col)  # one decision for every panel: they read alike
    for i, (ax, value) in enumerate(zip(axs, panels)):
        part = pts[pts[panel] == value]
        _draw(ax, part, x, col, palette, styles, xmap)
        if xticks is None:
            _steps_x(ax, pts[x])
        else:
            ax.set_xticks(range(len(xticks)), xticks)
        _value_y(ax, shared_y)
        _floor(ax, floor, ax.get_yscale() == "log")
        ax.set(xlabel=xlabel, ylabel=_ylabel(metric) if i % 3 == 0 else "")  # once per row of panels
        if len(panels) > 1:
            ax.set_title(panel_title(value), fontsize="medium")
    _legend(fig, order, palette, styles)
    skip = {x} | ({panel} if len(panels) > 1 else set()) | ({"eval.ema"} if len(styles) > 1 else set())
    note = caption(df, skip) + (" · solid: EMA weights, dashed: raw weights" if len(styles) > 1 else "")
    return _finish(fig, title, note)


# ----------------------------------------------------------------------------------------
# Figures


def quality_vs_nfe(df: pd.DataFrame, metric: str) -> Figure | None:
    """One line per method variant and EMA setting against NFE; a panel per model size."""
    data = df["data"].iloc[0] if len(df) else ""
    return _line_figure(at_reference(df, {"eval.ema"}), metric, "nfe", "model", {"nfe", "model."},
                        "NFE (sampling steps)", f"{data}: {metric_info(metric).label} vs NFE",
                        lambda m: str(m))


def quality_vs_guidance(df: pd.DataFrame, metric: str) -> Figure | None:
    """Quality against guidance scale, a line per swept method variant, a panel per NFE."""
    if "guidance" not in df.columns or df["guidance"].nunique() < 2:
        return None
    curve = ["method", "nfe", "model"] + (["eval.ema"] if "eval.ema" in df.columns else [])
    df = df[df.groupby(curve, dropna=False)["guidance"].transform("nunique") > 1]  # swept lines only
    if df.empty:
        return None
    return _line_figure(df, metric, "guidance", "nfe", {"guidance", "nfe"}, "guidance scale ω",
                        f"{df['data'].iloc[0]}: {metric_info(metric).label} vs guidance", lambda n: f"NFE {n}")


def quality_vs_model_size(df: pd.DataFrame, metric: str) -> Figure | None:
    """Quality against model size (small to large), a line per method variant, a panel per NFE."""
    if "model" not in df.columns or df["model"].nunique() < 2:
        return None
    df = at_reference(df, {"eval.ema"})
    models = model_order(df)
    return _line_figure(df, metric, "model", "nfe", {"model", "model.", "nfe"}, "model size",
                        f"{df['data'].iloc[0]}: {metric_info(metric).label} vs model size",
                        lambda n: f"NFE {n}", xmap={m: i for i, m in enumerate(models)}.get, xticks=models)


GUIDANCE_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def quality_vs_cost(df: pd.DataFrame, metric: str, cost: str = "") -> Figure | None:
    """Quality against a cost axis (counted sampling FLOPs by default, see
    :func:`benchmark.compare.cost_axis`) at the default EMA; a marker per guidance scale,
    the Pareto front as a step line with its points labelled ``NFE n`` (and ω)."""
    col = f"metric.{metric}"
    if col not in df.columns or df[col].isna().all():
        return None
    df = at_reference(df, {"guidance"})
    axis = cost_axis(df, cost)
    values = [col] + ([axis] if axis != "nfe_counted" else [])  # nfe_counted is a setting, not a value
    agg = aggregate(df, values, {"nfe", "guidance", "model", "model."}).dropna(subset=[col])
    agg["front"] = pareto_front(agg[axis], agg[col], metric_info(metric).lower_is_better is not False)
    agg, order = _series(agg, {"nfe", "guidance", "model", "model."})
    palette = _palette(order)
    omegas = sorted(agg["guidance"].unique())
    markers = dict(zip(omegas, GUIDANCE_MARKERS * 3))
    floor = floor_value(df, metric)
    fig, [ax] = _panels(1, width=5.6, height=3.8)
    front = agg[agg["front"]].sort_values(axis)
    ax.step(front[axis], front[col], where="post", color="0.3", lw=1, ls="--", zorder=1)
    for (series, omega), pts in agg.groupby(["series", "guidance"], sort=False):
        ax.errorbar(pts[axis], pts[col], yerr=_interval(pts, col), ls="none", marker=markers[omega], ms=6,
                    color=palette[series], mec="white", mew=0.6, elinewidth=0.8, alpha=0.9)
    labels = front.assign(_text=[f"NFE {r.nfe}" + (f", ω {r.guidance:g}" if len(omegas) > 1 else "")
                                 for _, r in front.iterrows()])
    for text, group in labels.groupby("_text", sort=False):  # one label per NFE (and ω): no overprint
        r = group.loc[group[col].idxmin()]
        ax.annotate(text, (r[axis], r[col]), textcoords="offset points", xytext=(5, -9), fontsize="x-small",
                    color="0.2")
    formatter = EngFormatter(unit="s" if axis == "sec_per_sample" else "", sep="")
    if spans_decades(agg[axis]):
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, formatter)
    elif axis != "nfe_counted":
        ax.xaxis.set_major_formatter(formatter)
    _value_y(ax, _span(agg, col))
    _floor(ax, floor, ax.get_yscale() == "log")
    ax.set(xlabel=COST_AXES[axis], ylabel=_ylabel(metric))
    extra = [Line2D([], [], color="0.3", ls="--", lw=1, label="Pareto front")]
    if len(omegas) > 1:
        extra += [Line2D([], [], color="0.4", ls="none", marker=markers[w], label=f"ω = {w:g}") for w in omegas]
    _legend(fig, order, palette, {}, extra, line=False)
    title = f"{df['data'].iloc[0]}: {metric_info(metric).label} vs {COST_AXES[axis].split(' per ')[0]}"
    return _finish(fig, title, caption(df, {"guidance"} if len(omegas) > 1 else set()))


def training_curves(df: pd.DataFrame, curves: pd.DataFrame) -> Figure | None:
    """Training loss against step, one line per training run, a colour per method variant
    (seeds of a variant share it)."""
    curves = curves[curves["train_key"].isin(set(df["train_key"]))]
    if curves.empty:
        return None
    runs = df.drop_duplicates("train_key")
    runs, order = _series(runs, {"nfe", "guidance", "eval.", "nfe_counted"})
    variant = runs.set_index("train_key")["series"]
    palette = _palette(order)
    # a dash pattern per variant as well as a colour: two variants whose losses coincide
    # (MeanFlow's and iMF's adaptive-weighted losses both sit at ~1) stay visible
    patterns = ["-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1))]
    dashes = {s: patterns[i % len(patterns)] for i, s in enumerate(order)}
    fig, [ax] = _panels(1, width=5.6, height=3.6)
    for key, curve in curves.groupby("train_key", sort=False):
        curve = curve.sort_values("step")
        ax.plot(curve["step"], curve["loss"], color=palette[variant[key]], ls=dashes[variant[key]],
                lw=1.6, alpha=0.85)
    _value_y(ax, curves["loss"])
    ax.set(xlabel="optimizer step", ylabel="training loss")
    _legend(fig, order, palette, {}, marker="", dashes=dashes)
    runs_per = runs.groupby("series").size().max()
    note = " · ".join(filter(None, [caption(runs, {"guidance", "eval.ema", "eval.num_samples"}, seeds=False),
                                    f"a line per seed ({runs_per} per variant)" if runs_per > 1 else "",
                                    "each method's own objective (not comparable across methods)"]))
    return _finish(fig, f"{df['data'].iloc[0]}: training curves", note)


def sample_grids(df: pd.DataFrame, results_dir: Path) -> Figure | None:
    """Sample grids side by side for one model size: a row per method variant, a column per
    NFE (first seed; the default EMA; guidance 1 where evaluated, else the scale nearest)."""
    df = at_reference(df[df["grid"].notna()], {"guidance"})
    if df.empty:
        return None
    df, order = _series(df, {"nfe", "guidance", "nfe_counted"})
    df = df.assign(_off=(df["guidance"] - 1).abs()).sort_values(["seed", "_off"], kind="stable")
    picks = df.drop_duplicates(["series", "nfe"])
    nfes = sorted(picks["nfe"].unique())
    fig, axes = plt.subplots(len(order), len(nfes), figsize=(1.9 * len(nfes) + 2.0, 1.9 * len(order) + 0.4),
                             squeeze=False, layout="constrained")
    for i, variant in enumerate(order):
        for j, nfe in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            ax.grid(False)
            hit = picks[(picks["series"] == variant) & (picks["nfe"] == nfe)]
            path = Path(results_dir) / str(hit["grid"].iloc[0]) if len(hit) else None
            if path is not None and path.is_file():
                ax.imshow(plt.imread(path), cmap="gray", interpolation="nearest")
            else:
                ax.set_facecolor("0.95")
            if i == 0:
                ax.set_title(f"NFE {nfe}", fontsize="medium")
            if j == 0:
                ax.set_ylabel(variant, fontsize="small")
    return _finish(fig, f"{df['data'].iloc[0]} · {df['model'].iloc[0]}: samples",
                   caption(df, {"model", "guidance"}, seeds=False) + " · first seed")


# ----------------------------------------------------------------------------------------
# Writing


def _render(fig: Figure, fmt: str, dpi: int = DPI) -> bytes:
    buffer = io.BytesIO()
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    with plt.rc_context(SAVE_RC):
        fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.08, metadata=metadata)
    return buffer.getvalue()


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (and closed)."""
    data = _render(fig, "png", dpi)
    plt.close(fig)
    return data


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """``stem.png`` (``DPI``), ``stem.pdf`` and ``stem.svg``, each written atomically; the
    figure is closed."""
    paths = []
    for fmt in FORMATS:
        path = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write_bytes(path, _render(fig, fmt))
        paths.append(path)
    plt.close(fig)
    return paths


def figures(df: pd.DataFrame, curves: pd.DataFrame, results_dir: Path, metric: str = "",
            cost: str = "") -> dict[str, Figure]:
    """Every figure of a selection, named ``<metric>_vs_nfe__<data>`` and so on; each reads
    ``metric`` (else the dataset's headline metric)."""
    out: dict[str, Figure | None] = {}
    for data, part in reported_rows(df).groupby("data", sort=True):
        m = metric or quality_metric(data)
        out[f"{m}_vs_nfe__{data}"] = quality_vs_nfe(part, m)
        out[f"{m}_vs_guidance__{data}"] = quality_vs_guidance(part, m)
        out[f"{m}_vs_model_size__{data}"] = quality_vs_model_size(part, m)
        out[f"{m}_vs_cost__{data}"] = quality_vs_cost(part, m, cost)
        out[f"training_curves__{data}"] = training_curves(part, curves)
        for model in model_order(part):
            out[f"samples__{data}__{model}"] = sample_grids(part[part["model"] == model], results_dir)
    return {k: v for k, v in out.items() if v is not None}


def write_plots(df: pd.DataFrame, curves: pd.DataFrame, results_dir: Path, out: Path, metric: str = "",
                cost: str = "") -> list[Path]:
    """Save every figure as ``out/<name>.png``, ``.pdf`` and ``.svg`` (atomically) and return
    the PNG paths; stale figures in ``out`` are removed."""
    written = []
    for name, fig in figures(df, curves, results_dir, metric, cost).items():
        written += save_figure(fig, out / name)
    for stale in {p for fmt in FORMATS for p in out.glob(f"*.{fmt}")} - set(written):
        stale.unlink()
    return [p for p in written if p.suffix == ".png"]
