"""The long-format results table: one row per evaluation, rebuilt from the records on disk.

``results/runs/<train_key>/evals/<eval_key>.json`` (written by ``benchmark.evaluate``) and
the training identity in ``runs/<train_key>/config.json`` become one row each, with
prefixed columns (benchopt's layout)::

    method, model, data, seed, nfe, nfe_counted, guidance      what was compared
    train.<field>  method.<field>  model.<field>  data.<option>  eval.<field>   parameters
    metric.<name>                                              every metric of the record
    sample_seconds, sec_per_sample, metric_seconds, train_seconds
    prov.git, prov.torch, prov.device, prov.date, ...          provenance
    record, grid                                               paths relative to results_dir

Written atomically to ``results/tables/results.parquet`` and ``results.csv``; the training
curves (``runs/*/curve.csv``) go to ``curves.parquet`` / ``curves.csv`` beside them.  The
records stay the truth: delete the tables at any time and run
``python -m benchmark.table`` (or ``python -m benchmark.report``) to rebuild them.
Torch-free (pandas and pyarrow only).
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.catalog import DATASETS
from benchmark.metrics import registry
from benchmark.schema import UserError
from benchmark.store import atomic_write_bytes

# ----------------------------------------------------------------------------------------
# Metric facts shared by the tables, the plots and the notebook: read from the one metric
# registry (benchmark.metrics.registry), per dataset through its metric suite.

FLOORS = registry.FLOORS
"""The floor of a perfect generator for a metric, measured the same way (digits)."""


def metric_info(name: str) -> registry.Metric:
    """The metric's heading (``label``), ``lower_is_better`` (None: never marked best) and format."""
    return registry.metric(name)


def _suite(data: str) -> str:
    info = DATASETS.get(data)
    return info.metric if info else ""


def quality_metric(data: str) -> str:
    """The headline metric name of a dataset (``fd_matched`` for digits, ``sw2`` for toys)."""
    return registry.headline(_suite(data))


def table_metrics(data: str) -> tuple[str, ...]:
    """The metrics worth a comparison table for a dataset, headline first."""
    return registry.table_metrics(_suite(data)) or ("fd",)


# ----------------------------------------------------------------------------------------
# Columns

ID_COLUMNS = ["method", "model", "data", "seed", "nfe", "nfe_counted", "nfe_declared", "guidance", "ema"]
TIME_COLUMNS = ["sample_seconds", "sec_per_sample", "metric_seconds", "train_seconds"]
# Counted costs (benchmark.flops): deterministic, unlike the measured seconds.
FLOP_COLUMNS = {"train_flops_per_step": "train_per_step", "train_flops": "train_total",
                "sample_flops": "sample_per_sample"}
COST_AXES = {"sample_flops": "sampling FLOPs per sample", "nfe_counted": "counted network passes per sample",
             "train_flops": "training FLOPs", "sec_per_sample": "measured sampling seconds per sample"}
"""Cost axes the report can put quality against; the first is the default."""
KEY_COLUMNS = ["train_key", "eval_key", "record", "grid"]
PREFIXES = ("train.", "method.", "model.", "data.", "eval.", "metric.", "prov.")
# Columns that tell replicate runs apart without making them different configurations.
REPLICATE_COLUMNS = {"seed", "eval.seed", "train_key", "eval_key", "record", "grid"}


def config_columns(df: pd.DataFrame) -> list[str]:
    """Every column that defines what was run (method, parameters), seeds excluded."""
    params = [c for c in df.columns if c.startswith(PREFIXES[:5])]
    return [c for c in ["method", "model", "data", "nfe", "nfe_counted", "guidance", *params]
            if c in df.columns and c not in REPLICATE_COLUMNS]


def metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("metric.")]


def _cell(value: Any) -> Any:
    """Scalars stay; lists and dicts become JSON text (parquet and CSV need flat cells)."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _metric_cells(metrics: dict) -> dict[str, Any]:
    """``metric.<name>``; a vector metric (a 2-D sample mean) gets ``metric.<name>.<i>``."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                out[f"metric.{name}"] = value[0]
            else:
                out.update({f"metric.{name}.{i}": v for i, v in enumerate(value)})
        elif isinstance(value, (int, float, bool)) or value is None:
            out[f"metric.{name}"] = value
    return out


def record_row(record: dict, identity: dict | None, record_path: str, grid_path: str | None) -> dict:
    """One table row from an evaluation record and its training identity (config.json)."""
    identity = identity or {}
    row: dict[str, Any] = {k: record.get(k) for k in ID_COLUMNS}
    train = dict(identity.get("train", {}))
    train.setdefault("steps", record.get("train_steps"))
    row.update({f"train.{k}": _cell(v) for k, v in train.items()})
    method = {"version": identity.get("method", {}).get("version"),
              **record.get("method_train", {}), **record.get("method_eval", {})}
    row.update({f"method.{k}": _cell(v) for k, v in method.items()})
    model = {k: v for k, v in identity.get("model", {}).items() if k != "name"}
    if "num_params" in record:
        model["params"] = record["num_params"]
    row.update({f"model.{k}": _cell(v) for k, v in model.items()})
    data = identity.get("data", {})
    row.update({f"data.{k}": _cell(v) for k, v in data.get("options", {}).items()})
    if "version" in data:
        row["data.version"] = data["version"]
    ev = record.get("identity", {})
    row.update({f"eval.{k}": _cell(v) for k, v in ev.get("eval", {}).items()})
    row.update({"eval.checkpoint": ev.get("checkpoint"), "eval.metric": ev.get("metric")})
    row.update(_metric_cells(record.get("metrics", {})))
    for name, (lo, hi) in record.get("intervals", {}).items():  # 95% intervals of one evaluation
        row[f"metric.{name}_lo"], row[f"metric.{name}_hi"] = lo, hi
    row.update({k: record.get(k) for k in TIME_COLUMNS})
    row.update({k: record.get("flops", {}).get(v) for k, v in FLOP_COLUMNS.items()})
    row.update({f"prov.{k}": _cell(v) for k, v in record.get("provenance", {}).items()})
    row.update({"train_key": record.get("train_key"), "eval_key": record.get("eval_key"),
                "record": record_path, "grid": grid_path})
    return row


# ----------------------------------------------------------------------------------------
# Reading the records


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable {what} ({type(err).__name__}); expected the JSON "
                        f"benchmark.run writes; delete it and rerun the command that made it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, expected a JSON object ({what}); "
                        f"delete it and rerun the command that made it")
    return obj


def collect_rows(results_dir: Path) -> list[dict]:
    """One row per ``runs/*/evals/*.json`` record, in a stable (path) order."""
    rows = []
    for path in sorted(results_dir.glob("runs/*/evals/*.json")):
        record = _read_json(path, "evaluation record")
        if "metrics" not in record or "method" not in record:
            raise UserError(f"{path} lacks 'metrics' or 'method', so it is not an evaluation record; "
                            f"delete it and rerun the command that made it")
        config = path.parent.parent / "config.json"
        identity = _read_json(config, "training config").get("identity") if config.is_file() else None
        grid = path.parent.parent / "samples" / f"{path.stem}.png"
        rows.append(record_row(record, identity, path.relative_to(results_dir).as_posix(),
                               grid.relative_to(results_dir).as_posix() if grid.is_file() else None))
    return rows


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in ID_COLUMNS if c in df.columns]
    grouped = [sorted(c for c in df.columns if c.startswith(p)) for p in PREFIXES]
    ordered = first + [c for g in grouped[:5] for c in g] + grouped[5] + TIME_COLUMNS + list(FLOP_COLUMNS) + grouped[6]
    ordered += [c for c in KEY_COLUMNS if c in df.columns]
    return df[[c for c in ordered if c in df.columns]]


def _uniform_types(df: pd.DataFrame) -> pd.DataFrame:
    """A column holding both text and numbers becomes text, so parquet can store it."""
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if str in kinds and len(kinds) > 1:
                df[col] = df[col].map(lambda v: None if v is None else str(v))
    return df


def build_table(results_dir: str | Path) -> pd.DataFrame:
    """The results table from the records under ``results_dir`` (empty frame if none)."""
    rows = collect_rows(Path(results_dir))
    if not rows:
        return pd.DataFrame(columns=ID_COLUMNS + TIME_COLUMNS + KEY_COLUMNS)
    df = pd.DataFrame(rows)
    for col in ("nfe", "seed"):
        df[col] = df[col].astype("int64")
    return _order_columns(_uniform_types(df)).reset_index(drop=True)


def build_curves(results_dir: str | Path) -> pd.DataFrame:
    """Training curves in long format: train_key, method, model, data, seed, step, loss, lr."""
    frames = []
    for path in sorted(Path(results_dir).glob("runs/*/curve.csv")):
        config = path.parent / "config.json"
        if not config.is_file():
            continue
        identity = _read_json(config, "training config").get("identity", {})
        try:
            curve = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            print(f"warning: skipped unreadable training curve {path}", file=sys.stderr)
            continue
        curve.insert(0, "train_key", path.parent.name)
        curve.insert(1, "method", identity.get("method", {}).get("name"))
        curve.insert(2, "model", identity.get("model", {}).get("name"))
        curve.insert(3, "data", identity.get("data", {}).get("name"))
        curve.insert(4, "seed", identity.get("seed"))
        frames.append(curve)
    columns = ["train_key", "method", "model", "data", "seed", "step", "loss", "lr"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


# ----------------------------------------------------------------------------------------
# Writing and reading the table files


def tables_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "tables"


def write_frame(df: pd.DataFrame, stem: Path) -> None:
    """``<stem>.parquet`` and ``<stem>.csv``, each written atomically."""
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    atomic_write_bytes(stem.with_suffix(".parquet"), buffer.getvalue())
    atomic_write_bytes(stem.with_suffix(".csv"), df.to_csv(index=False).encode())


def rebuild(results_dir: str | Path) -> Path:
    """Rebuild ``tables/results.*`` and ``tables/curves.*``; return the parquet path."""
    out = tables_dir(results_dir)
    write_frame(build_table(results_dir), out / "results")
    write_frame(build_curves(results_dir), out / "curves")
    return out / "results.parquet"


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a results table (parquet or CSV) written by :func:`rebuild`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no results table at {path}; expected one written by python -m benchmark.table "
                        f"(run it, or python -m benchmark.report, after python -m benchmark.run)")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmark.table [results_dir=DIR]``: rebuild the tables, print their paths."""
    from benchmark.cli import entry

    return entry(_main, argv, "usage: python -m benchmark.table [results_dir=DIR] [--help]\n\n"
                 + (__doc__ or "").strip())


def _main(argv: list[str]) -> int:
    results_dir = "results"
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key != "results_dir" or not sep or not value:
            raise UserError(f"unknown argument '{arg}'; expected results_dir=DIR "
                            f"(usage: python -m benchmark.table [results_dir=DIR])")
        results_dir = value
    if not Path(results_dir).is_dir():
        raise UserError(f"results_dir={results_dir} does not exist; expected the folder python -m "
                        f"benchmark.run wrote (default results/)")
    path = rebuild(results_dir)
    print(f"{len(read_table(path))} evaluation(s) -> {path} (and .csv); curves -> {path.parent / 'curves.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
