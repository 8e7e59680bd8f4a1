"""Choosing, labelling and pooling the rows a comparison compares (torch-free): the layer
under both the report's tables (``benchmark.report``) and its plots (``benchmark.plots``).

- :func:`reported_rows` / :func:`at_reference`: which evaluations a table reads (the
  reported evaluation seed; every swept evaluation axis but the table's own held at its
  reference: omega = 1, the default EMA);
- :func:`variant_labels` / :func:`aggregate`: one row per configuration, seeds pooled, with
  a 95% interval (Student's t over seeds, or the evaluation's own bootstrap interval);
- :func:`cost_axis` / :func:`pareto_front`: quality against a counted cost;
- :func:`method_rank` / :func:`model_order`: the order rows and columns are shown in.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from benchmark.backbones.sizes import size_order
from benchmark.schema import EvalConfig, ModelConfig, UserError
from benchmark.table import COST_AXES, config_columns

REPORTED_EVAL_SEED = EvalConfig().seed
"""The evaluation seed tables report; any other evaluation seed only chooses guidance."""
DEFAULT_EMA = EvalConfig().ema
"""The evaluation weights (sigma_rel of the post-hoc EMA) a table reads where EMA is swept."""


def method_rank(name: str) -> tuple[int, str]:
    from methods.specs import METHOD_NAMES

    return (METHOD_NAMES.index(name) if name in METHOD_NAMES else len(METHOD_NAMES), name)


def model_order(df: pd.DataFrame) -> list[str]:
    """Models from small to large: by recorded parameter count, else in the order of the
    size registry (``benchmark.backbones.sizes``)."""
    models = list(df["model"].dropna().unique())
    if "model.params" in df.columns and df["model.params"].notna().all():
        params = df.groupby("model")["model.params"].mean()
        return sorted(models, key=lambda m: params[m])
    order = size_order()
    return sorted(models, key=lambda m: (order.index(m) if m in order else len(order), m))


def size_key(df: pd.DataFrame, group: tuple) -> tuple:
    """Sort key of a (data, model, ...) group: data by name, then model from small to large."""
    order = model_order(df[df["data"] == group[0]])
    return (group[0], order.index(group[1]) if group[1] in order else len(order), *map(str, group[2:]))


def short_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def varying_fields(df: pd.DataFrame, axes: set[str]) -> dict[str, list[str]]:
    """Per method: the settings that vary between its rows, except the axes (an axis ending
    in "." names a prefix: "model." drops every model.* column)."""
    skip = axes | {"method", "nfe_counted"}
    prefixes = tuple(a for a in axes if a.endswith("."))
    return {method: [c for c in config_columns(rows) if c not in skip and not (prefixes and c.startswith(prefixes))
                     and rows[c].astype(str).nunique(dropna=False) > 1]
            for method, rows in df.groupby("method", sort=False)}


def field_default(method: str, column: str):
    """The default of a ``method.*`` or ``model.*`` setting (the method's spec, the model
    schema), or None where there is none to compare with."""
    from methods.specs import get_spec

    group, _, name = column.partition(".")
    try:
        cls = get_spec(method).Config if group == "method" else ModelConfig if group == "model" else None
    except (KeyError, ValueError):
        return None
    found = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    if name not in found or found[name].default is dataclasses.MISSING:
        return None
    return found[name].default


def _same(value, default) -> bool:
    if default is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value) == str(default) or (isinstance(default, (int, float)) and not isinstance(default, bool)
                                          and isinstance(value, (int, float)) and float(value) == float(default))


def variant_labels(df: pd.DataFrame, axes: set[str], name=str) -> pd.Series:
    """``method`` plus the settings that vary within that method, except the axes, each as
    ``name(column)=value``.  Where one setting varies every label names it; where several
    vary (an ablation), a label names only those where the row departs from the method's
    defaults (``field_default``), and a row at every default reads ``method (defaults)``,
    so ``imf (method.omega_max=1)`` rather than the value of every ablated field.

    Two rows share a label exactly when they differ only in the axes (and seeds): two
    configurations differ in some varying setting, and at most one of them is at its default."""
    fields = varying_fields(df, axes)
    labels = pd.Series("", index=df.index, dtype=object)
    for i, row in df.iterrows():
        method, shown = row["method"], fields[row["method"]]
        if len(shown) > 1:
            shown = [c for c in shown if not _same(row[c], field_default(method, c))]
            if not shown:
                labels[i] = f"{method} (defaults)"
                continue
        extra = ", ".join(f"{name(c)}={short_value(row[c])}" for c in shown)
        labels[i] = f"{method} ({extra})" if extra else str(method)
    return labels


def _key_text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def configurations(df: pd.DataFrame) -> pd.Series:
    """A text key per row naming its configuration (``config_columns``: seeds excluded), so
    the seeds of one configuration share it; NaN-holding settings group reliably as text."""
    keys = config_columns(df)
    return pd.Series(["\x1f".join(map(_key_text, row)) for row in df[keys].itertuples(index=False)],
                     index=df.index, dtype=object)


def aggregate(df: pd.DataFrame, values: list[str], axes: set[str]) -> pd.DataFrame:
    """One row per configuration (seeds pooled): its settings, ``label`` (see
    :func:`variant_labels`), the first sample grid, the count ``n`` and per value: its mean,
    ``<v>.std``, the per-seed values ``<v>.values`` and a 95% interval ``<v>.lo``/``<v>.hi``.

    The interval is Student's t over the seeds where a configuration was run with ``n > 1``
    seeds (mean +- t_{0.975, n-1} std / sqrt(n)); with one seed it is that evaluation's own
    bootstrap interval (``metric.<name>_lo/_hi`` in the record), which measures only the
    sampling noise of the metric."""
    from scipy import stats

    keys = config_columns(df)
    values = [v for v in values if v in df.columns]
    groups = df.assign(label=variant_labels(df, axes), _config=configurations(df)).groupby("_config", sort=False)
    out = pd.concat([groups[keys + ["label", "grid"]].first(), groups[values].mean(),
                     groups[values].std(ddof=1).add_suffix(".std"), groups.size().rename("n")],
                    axis=1).reset_index(drop=True)
    lists = groups[values].agg(list).reset_index(drop=True)
    firsts = groups.first().reset_index(drop=True)
    for v in values:
        out[f"{v}.values"] = lists[v]
        half = stats.t.ppf(0.975, (out["n"] - 1).clip(lower=1)) * out[f"{v}.std"] / out["n"] ** 0.5
        lo = firsts[f"{v}_lo"] if f"{v}_lo" in firsts else pd.Series(math.nan, index=out.index)
        hi = firsts[f"{v}_hi"] if f"{v}_hi" in firsts else pd.Series(math.nan, index=out.index)
        seeds = out["n"] > 1
        out[f"{v}.lo"] = (out[v] - half).where(seeds, lo)
        out[f"{v}.hi"] = (out[v] + half).where(seeds, hi)
    return out


def reported_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows at the reported evaluation seed; other evaluation seeds only choose guidance
    (:func:`best_guidance`).  Everything when the selection holds one evaluation seed."""
    if "eval.seed" not in df.columns or df["eval.seed"].nunique() < 2:
        return df
    reported = df[df["eval.seed"].astype(float) == REPORTED_EVAL_SEED]
    return reported if not reported.empty else df


def at_unit_guidance(df: pd.DataFrame) -> pd.DataFrame:
    """Where the selection sweeps evaluation guidance, the Method × NFE tables read every
    method at omega = 1 (the curves are in the guidance tables, the chosen omega in the
    best-guidance table); a selection at a single guidance keeps it."""
    if "guidance" not in df.columns or df["guidance"].nunique() < 2:
        return df
    unit = df[df["guidance"].astype(float) == 1.0]
    return unit if not unit.empty else df


def at_default_ema(df: pd.DataFrame) -> pd.DataFrame:
    """Where the selection sweeps the evaluation weights (``eval.ema=raw,0.05,0.1``), the rows
    at the default sigma_rel (:data:`DEFAULT_EMA`); a selection at one setting, or without a
    row at the default, keeps every row."""
    if "eval.ema" not in df.columns or df["eval.ema"].astype(str).nunique() < 2:
        return df
    default = df[df["eval.ema"].astype(str) == str(DEFAULT_EMA)]
    return default if not default.empty else df


def at_reference(df: pd.DataFrame, keep: set[str] = frozenset()) -> pd.DataFrame:
    """The rows a table or plot over the axes ``keep`` reads: every other swept evaluation
    axis held at its reference (``guidance`` at omega = 1, ``eval.ema`` at the default), so
    that each varying axis has a table of its own and no table mixes in another's rows."""
    if "guidance" not in keep:
        df = at_unit_guidance(df)
    if "eval.ema" not in keep:
        df = at_default_ema(df)
    return df


def ema_order(values) -> list:
    """EMA settings in reading order: ``raw`` first, then sigma_rel from short to long."""
    def key(v):
        try:
            return (1, float(v))
        except (TypeError, ValueError):
            return (0, 0.0)
    return sorted(dict.fromkeys(values), key=key)


def ema_text(value) -> str:
    """``raw weights`` or ``EMA σ_rel 0.1``."""
    try:
        return f"EMA σ_rel {float(value):g}"
    except (TypeError, ValueError):
        return "raw weights" if str(value) == "raw" else f"EMA {value}"


def cost_axis(df: pd.DataFrame, wanted: str = "") -> str:
    """The cost column quality is put against: ``wanted`` (one of ``COST_AXES``), else the
    first counted axis every row holds (sampling FLOPs; counted passes for records written
    before FLOP accounting: ``python -m benchmark.flops`` adds them)."""
    if wanted:
        if wanted not in COST_AXES:
            raise UserError(f"cost={wanted} is not a cost axis; expected one of {', '.join(COST_AXES)}")
        if wanted not in df.columns or df[wanted].isna().all():
            raise UserError(f"cost={wanted}: the selected records do not hold it; run python -m benchmark.flops "
                            f"to count FLOPs of older records, or choose cost=nfe_counted")
        return wanted
    for axis in COST_AXES:
        if axis in df.columns and df[axis].notna().all():
            return axis
    return "sec_per_sample"


def pareto_front(cost: pd.Series, quality: pd.Series, lower_is_better: bool) -> pd.Series:
    """True for points no other point beats on both cost and quality (ties kept)."""
    q = quality if lower_is_better else -quality
    front = []
    for i in cost.index:
        dominated = ((cost <= cost[i]) & (q <= q[i]) & ((cost < cost[i]) | (q < q[i]))).any()
        front.append(not dominated and not (math.isnan(cost[i]) or math.isnan(q[i])))
    return pd.Series(front, index=cost.index)
