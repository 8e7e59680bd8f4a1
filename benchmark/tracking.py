"""MLflow mirror of the results on disk.

The records on disk are the truth; MLflow mirrors them, and a run's identity in MLflow is
its key, carried as tags: ``kind`` plus ``train_key`` (a training), ``eval_key`` (an
evaluation), ``optuna_study`` and ``optuna_trial`` (a tuning study and its trials).  To
mirror a unit the tracker first looks it up by those tags (``search_runs``) and creates
it, tags included, in one ``create_run`` only when it is not there.  So mirroring is
idempotent under any interleaving of drivers, kills and reruns:

* every lookup-create-fill runs under an ``fcntl`` lock, ``<results_dir>/mlflow.lock``, so
  concurrent drivers of one results folder never create the same run twice, and the
  sqlite store is created (its schema migrated) by one process at a time;
* a run is filled deterministically (same parameters, metrics with the same timestamps
  and steps, the same artifact paths) and marked FINISHED last, so a run a killed mirror
  left RUNNING is found, filled again and finished, never duplicated;
* nothing is keyed by an absolute path: the default store is ``sqlite:///<results_dir>/
  mlflow.db`` resolved when used, and when a copied or moved results folder opens its
  store, the experiment's artifact location is moved to the copy's own ``mlartifacts/``
  (runs copied with it follow), so the copy never writes into the original folder;
* a run carries ``record_digest``, a hash of the record it mirrors: a record computed
  again (``--force``, ``--force-train``, or after a corrupt one was moved aside) updates its
  run in place, the same run id, its digest written last so a mirror killed half-way
  updates it again: never a second run for one key.  On the folder's own sqlite store the
  old metric values are dropped first (the run holds exactly the new record); on a server,
  which has no call to delete metric values, the new values are logged after the old ones
  (the latest values, the ones tables show, are the record's).  A run whose record was
  removed (``--force-train`` drops the stale evaluations of the old checkpoint) is deleted,
  and restored, then updated, if that point is computed again.

Layout: one parent run per training (its whole resolved config as parameters, the loss and
learning-rate curve, the dataset as an ``mlflow.data`` input) with one nested run per
evaluation (the evaluation parameters, every metric, the sample grid upscaled to a readable
size).  Nested rather than flat: a training's parameters are logged once, on the checkpoint
they describe, and every evaluation of that checkpoint sits under it; the evaluation runs
carry the tags to filter and compare by (``method``, ``model``, ``data``, ``seed``,
``nfe``, ``guidance``, ``ema``), and the long-format results table (``benchmark.report``)
carries every parameter beside every metric.  Runs have real start and end times and the
git commit of the code (``mlflow.source.git.commit``).

Only the driver process logs (jobs write records to disk).  A tracking failure (a server
that is down, a broken store) prints one warning saying how to get out, the benchmark goes
on, and ``python -m benchmark.sync`` mirrors the records later.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.keys import short_hash
from benchmark.schema import TrackingConfig
from benchmark.store import Store, file_lock

DIGEST_TAG = "record_digest"
GRID_MIN_SIDE = 320  # pixels: the 8x8-digit grids (about 90 px) are upscaled to at least this


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


@functools.lru_cache(maxsize=1)
def source_info() -> dict[str, Any]:
    """The git commit, branch and dirtiness of the code running now ({} outside git)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    return {"git_commit": commit, "git_branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _source_tags(commit: str | None, entry: str) -> dict[str, str]:
    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def ema_label(record: dict) -> str:
    """How the evaluated weights were averaged: ``raw`` or ``ema=<sigma_rel>`` (post-hoc)."""
    eval_identity = (record.get("identity") or {}).get("eval") or {}
    ema = eval_identity.get("ema", record.get("ema", "raw"))
    return ema if isinstance(ema, str) else f"ema={ema:g}"


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _iso_seconds(text: str | None) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


@dataclass
class RunSpec:
    """One MLflow run as the disk records define it: the tags that find it, its name, its
    real start and end, and what it holds.  Everything is derived from the records, so
    filling the same run twice logs the same values (MLflow keeps one copy of each)."""

    find: dict[str, str]
    name: str
    start_ms: int
    end_ms: int
    digest: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, ms, step
    datasets: list[tuple[str, str, str]] = field(default_factory=list)  # name, digest, context
    artifacts: list[tuple[Path, str]] = field(default_factory=list)  # file, artifact folder
    status: str = "FINISHED"


def training_spec(train_key: str, identity: dict, summary: dict, source: dict | None, end: float,
                  sweep_tags: dict[str, str]) -> RunSpec:
    """The parent run of one training; ``end``: when it finished (epoch seconds)."""
    method, model, data = identity["method"]["name"], identity["model"]["name"], identity["data"]["name"]
    steps = identity["train"]["steps"]
    seconds = summary.get("seconds")
    end = summary.get("end_time") or end
    start = end - (seconds or 0.0)
    span = _ms(end) - _ms(start)
    metrics = []
    for step, loss, lr in summary.get("curve", []):
        when = _ms(start) + span * int(step) // max(1, steps)  # curve points spread over the run
        metrics += [("train_loss", float(loss), when, int(step)), ("lr", float(lr), when, int(step))]
    if seconds is not None:
        metrics.append(("train_seconds", float(seconds), _ms(end), steps))
    fingerprint = short_hash(identity["data"])
    tags = {"method": method, "model": model, "data": data, "seed": str(identity["seed"]),
            "train_steps": str(steps), **sweep_tags,
            **_source_tags((source or {}).get("git_commit"), "benchmark.run")}
    return RunSpec(find={"kind": "training", "train_key": train_key},
                   name=f"{method} {model} {data} [{train_key}]", start_ms=_ms(start), end_ms=_ms(end),
                   digest=short_hash({"identity": identity, "curve": summary.get("curve", []),
                                      "seconds": seconds}),
                   tags=tags, params=flatten(identity), metrics=metrics,
                   datasets=[(f"{data}-{fingerprint}", fingerprint, "training")])


def evaluation_spec(parent: str, record: dict, identity: dict | None, grid: Path, end: float,
                    sweep_tags: dict[str, str]) -> RunSpec:
    """The nested run of one evaluation record, under its training's run ``parent``;
    ``end``: when it finished if the record does not say (its file's time)."""
    provenance = record.get("provenance") or {}
    end = _iso_seconds(provenance.get("date")) or end
    seconds = float(record.get("sample_seconds") or 0) + float(record.get("metric_seconds") or 0)
    ema = ema_label(record)
    eval_identity = (record.get("identity") or {}).get("eval") or {}
    params = {"nfe": record["nfe"], "guidance": record["guidance"], "num_samples": record["num_samples"],
              "ema": ema, "checkpoint": record.get("checkpoint", "final"),
              **flatten(record.get("method_eval", {}), "method."), **flatten(eval_identity, "eval.")}
    values = {**record["metrics"], "nfe_counted": record["nfe_counted"],
              "sec_per_sample": record["sec_per_sample"], "metric_seconds": record["metric_seconds"]}
    metrics = [(k, float(v), _ms(end), 0) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    tags = {"mlflow.parentRunId": parent, "method": record["method"], "model": record["model"],
            "data": record["data"], "seed": str(record.get("seed", "")), "nfe": str(record["nfe"]),
            "guidance": str(record["guidance"]), "ema": ema, "train_key": record["train_key"], **sweep_tags,
            **_source_tags(provenance.get("git"), "benchmark.run")}
    datasets = []
    if identity is not None:
        fingerprint = short_hash(identity["data"])
        datasets.append((f"{record['data']}-{fingerprint}", fingerprint, "evaluation"))
    name = (f"{record['method']} {record['model']} {record['data']} nfe={record['nfe']} "
            f"w={record['guidance']:g} {ema} [{record['eval_key']}]")
    return RunSpec(find={"kind": "evaluation", "eval_key": record["eval_key"]}, name=name,
                   start_ms=_ms(end - seconds), end_ms=_ms(end), digest=short_hash(record), tags=tags,
                   params=params, metrics=metrics, datasets=datasets,
                   artifacts=[(grid, "samples")] if grid.is_file() else [])


def readable_grid(png: Path, folder: Path, min_side: int = GRID_MIN_SIDE) -> Path:
    """``png`` upscaled by an integer factor with nearest-neighbour (pixels stay sharp
    squares) until its longer side reaches ``min_side``; written into ``folder`` under the
    same name.  A grid already that large is returned as it is."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(png) as image:
            factor = -(-min_side // max(image.size))
            if factor <= 1:
                return png
            out = folder / png.name
            image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(out)
    except (OSError, UnidentifiedImageError):
        return png  # logged as it is; the record, not the picture, is the result
    return out


def relocate_artifacts(db: Path, experiment_id: str, old: str, new: str) -> None:
    """Point an experiment of the sqlite store ``db``, and its runs stored under ``old``, at
    ``new``: a copied results folder's store then reads and writes the copy's artifacts."""
    with sqlite3.connect(db, timeout=120) as con:
        con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                    "AND substr(artifact_uri, 1, ?) = ?", (new, len(old) + 1, experiment_id, len(old), old))
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, experiment_id))
    con.close()


def _quoted(value: str) -> str:
    quote = "'" if "'" not in value else '"'
    return f"{quote}{value}{quote}"


class Tracker:
    def __init__(self, cfg: TrackingConfig, store: Store, sweep: str = "", quiet: bool = False) -> None:
        """``sweep``: the command's overrides; runs get tags ``sweep`` (a short hash of them,
        for filtering in the UI) and ``sweep_overrides`` from the command that first logged them.
        ``quiet``: a failure sets ``problem`` without printing it (the caller says it)."""
        self.cfg, self.store, self.quiet = cfg, store, quiet
        self.sweep_tags = {"sweep": short_hash(sweep), "sweep_overrides": sweep[:500]} if sweep else {}
        self.local = not cfg.uri  # the results folder's own sqlite store
        self.uri = cfg.uri or store.mlflow_uri()
        self._client = None
        self._experiment_id: str | None = None
        self.down = False
        self.problem = ""  # the one line said when tracking failed
        self.logged: Counter[str] = Counter()  # runs this tracker created or finished, by kind
        if self.uri.startswith("http"):
            # fail in seconds, not minutes of retries, when the server is down
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    # -- plumbing ------------------------------------------------------------------------
    def _connect(self):
        """The client, once per tracker; the first use creates (or migrates) the store, so
        it runs under the folder's mirror lock like everything else."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            for name in ("mlflow", "alembic"):  # its INFO lines ("Creating initial MLflow database tables...")
                logging.getLogger(name).setLevel(logging.WARNING)
            client = MlflowClient(tracking_uri=self.uri)
            self._experiment_id = self._experiment(client)
            self._client = client
        return self._client

    def _experiment(self, client) -> str:
        found = client.get_experiment_by_name(self.cfg.experiment)
        ours = self.store.mlflow_artifacts().as_uri() if self.local else None
        if found is None:
            return client.create_experiment(self.cfg.experiment, artifact_location=ours)
        if ours and found.artifact_location != ours:  # this folder was copied or moved here
            relocate_artifacts(self.store.mlflow_db(), found.experiment_id, found.artifact_location, ours)
            print(f"notice: the MLflow store {self.store.mlflow_db()} was copied or moved from elsewhere: its "
                  f"artifacts now live in {self.store.mlflow_artifacts()} (was {found.artifact_location})")
        return found.experiment_id

    def lock(self):
        return file_lock(self.store.root / "mlflow.lock")

    def _safely(self, what: str, fn, *args):
        if not self.cfg.enabled or self.down:
            return None
        try:
            with self.lock():
                self._connect()
                return fn(*args)
        except Exception as err:  # the disk record is the truth; tracking must not fail a run
            self.down = True  # one warning, no per-record timeouts against a dead server
            self.problem = self._explain(what, err)
            if not self.quiet:
                print(f"warning: {self.problem}", file=sys.stderr, flush=True)
            return None

    def _explain(self, what: str, err: Exception) -> str:
        """One line: what failed, why, and the way out."""
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        root = self.store.root
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):])
            return (f"MLflow {what} failed: the store {db} is unusable ({reason}); the records on disk are "
                    f"intact: move it aside (mv {db} {db}.broken) and rebuild it from them with "
                    f"`python -m benchmark.sync results_dir={root}`")
        return (f"MLflow {what} failed at {self.uri} ({reason}); the records are on disk under {root}: "
                f"mirror them later with `python -m benchmark.sync results_dir={root} tracking.uri={self.uri}`")

    def _search(self, tags: dict[str, str], view=None) -> list:
        from mlflow.entities import ViewType

        query = " and ".join(f"tags.{k} = {_quoted(v)}" for k, v in tags.items())
        return self._client.search_runs([self._experiment_id], query, run_view_type=view or ViewType.ACTIVE_ONLY,
                                        max_results=20, order_by=["attributes.start_time ASC"])

    def _find(self, tags: dict[str, str]):
        """The run with these tags: an active one (a FINISHED one first, then the oldest),
        else a deleted one (restored by ``_ensure``), or None."""
        from mlflow.entities import ViewType

        runs = self._search(tags, ViewType.ALL)
        return min(runs, key=lambda r: (r.info.lifecycle_stage == "deleted", r.info.status == "RUNNING"),
                   default=None)

    def _ensure(self, spec: RunSpec, kind: str) -> str:
        """The run ``spec`` describes: found by its tags, else created with them; filled and
        finished unless it was complete already.  A run holding an older record (another
        digest) is updated in place; a deleted one is restored first."""
        client = self._client
        found = self._find(spec.find)
        if found is None:
            tags = {**spec.find, **spec.tags, DIGEST_TAG: spec.digest}
            run_id = client.create_run(self._experiment_id, start_time=spec.start_ms, tags=tags,
                                       run_name=spec.name).info.run_id
            self._fill(run_id, spec, {})
            client.set_terminated(run_id, status=spec.status, end_time=spec.end_ms)
            self.logged[kind] += 1
            return run_id
        run_id, info = found.info.run_id, found.info
        stale = found.data.tags.get(DIGEST_TAG, spec.digest) != spec.digest
        if not stale and info.status != "RUNNING" and info.lifecycle_stage != "deleted":
            return run_id
        if info.lifecycle_stage == "deleted":
            client.restore_run(run_id)
        if stale:
            self._clear(run_id, spec.start_ms)
        # filled again (left RUNNING by a killed mirror, or holding an older record); the
        # digest goes last: a mirror killed before it leaves the run to be updated again
        self._fill(run_id, spec, {**spec.find, **spec.tags})
        client.set_tag(run_id, DIGEST_TAG, spec.digest)
        client.set_terminated(run_id, status=spec.status, end_time=spec.end_ms)
        self.logged[kind] += 1
        return run_id

    def _clear(self, run_id: str, start_ms: int) -> None:
        """Before a run is updated with a new record: on the folder's own sqlite store, drop
        its metric values and set its start to the new record's (a server keeps them)."""
        if not (self.local and self.store.mlflow_db().is_file()):
            return
        with sqlite3.connect(self.store.mlflow_db(), timeout=120) as con:
            for table in ("metrics", "latest_metrics"):
                con.execute(f"DELETE FROM {table} WHERE run_uuid = ?", (run_id,))
            con.execute("UPDATE runs SET start_time = ? WHERE run_uuid = ?", (start_ms, run_id))
        con.close()

    def _fill(self, run_id: str, spec: RunSpec, tags: dict[str, str]) -> None:
        from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

        client = self._client
        params = [Param(k, str(v)[:500]) for k, v in spec.params.items()]
        metrics = [Metric(k, v, ms, step) for k, v, ms, step in spec.metrics]
        run_tags = [RunTag(k, str(v)) for k, v in tags.items() if k != "mlflow.parentRunId"]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for i in range(0, len(run_tags), 100):
            client.log_batch(run_id, tags=run_tags[i:i + 100])
        if spec.datasets:
            client.log_inputs(run_id, datasets=[
                DatasetInput(_dataset_entity(name, digest), tags=[InputTag("mlflow.data.context", context)])
                for name, digest, context in spec.datasets])
        with tempfile.TemporaryDirectory() as folder:
            for path, where in spec.artifacts:
                client.log_artifact(run_id, str(readable_grid(path, Path(folder))), artifact_path=where)

    # -- public --------------------------------------------------------------------------
    def log_training(self, train_key: str, identity: dict, summary: dict, source: dict | None = None) -> str | None:
        """The parent run of one finished training (None when tracking is off or failed)."""
        final = self.store.final_path(train_key)
        end = final.stat().st_mtime if final.is_file() else 0.0
        spec = training_spec(train_key, identity, summary, source, end, self.sweep_tags)
        return self._safely("logging of training", self._ensure, spec, "training")

    def log_evaluation(self, parent: str, record: dict, identity: dict | None = None) -> str | None:
        """The nested run of one evaluation record under its training's run ``parent``."""
        grid = self.store.grid_path(record["train_key"], record["eval_key"])
        path = self.store.eval_path(record["train_key"], record["eval_key"])
        end = path.stat().st_mtime if path.is_file() else 0.0
        spec = evaluation_spec(parent, record, identity, grid, end, self.sweep_tags)
        return self._safely("logging of evaluation", self._ensure, spec, "evaluation")

    def mirror_run(self, train_key: str, identity: dict, records: list[dict]) -> bool:
        """A finished training and these evaluation records of it; False once tracking failed."""
        config = self.store.read_config(train_key) or {}
        parent = self.log_training(train_key, identity, self.store.read_final_summary(train_key),
                                   config.get("source"))
        return parent is not None and all(self.log_evaluation(parent, r, identity) is not None for r in records)

    def forget_evaluations(self, eval_keys: list[str]) -> None:
        """Delete the runs of evaluation records that were removed (``--force-train``: they
        measured a checkpoint that is gone); a run comes back if its point is computed again."""
        def delete() -> None:
            for key in eval_keys:
                for run in self._search({"kind": "evaluation", "eval_key": key}):
                    self._client.delete_run(run.info.run_id)

        if eval_keys:
            self._safely("deletion of stale evaluations", delete)

    def check(self) -> bool:
        """Open the store (creating it if new); False, with ``problem`` set, if it is unusable."""
        return self._safely("opening of the store", lambda: True) is True


@functools.lru_cache(maxsize=64)
def _dataset_entity(name: str, digest: str):
    """An ``mlflow.data`` dataset entity: metadata only (the data stays where it is)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    source = CodeDatasetSource({"loader": "benchmark.data", "dataset": name.rsplit("-", 1)[0]})
    return MetaDataset(source=source, name=name, digest=digest)._to_mlflow_entity()


class StudyTracker(Tracker):
    """An Optuna study in MLflow: one parent run per study, one child run per finished
    trial (its parameters, the objective, the intermediate values by training step, tags
    with the study, the trial number and state, and the benchmark run's keys), found by
    the tags ``optuna_study`` and ``optuna_trial``."""

    def __init__(self, cfg: TrackingConfig, store: Store, study: str, study_dir: Path, quiet: bool = False) -> None:
        super().__init__(cfg, store, sweep=f"study {study}", quiet=quiet)
        self.study, self.study_dir = study, study_dir

    def _trial_tags(self, number: int) -> dict[str, str]:
        return {"kind": "trial", "optuna_study": self.study, "optuna_trial": str(number)}

    def has_trial(self, number: int) -> bool:
        """The trial's run is in MLflow and finished (False when tracking is off or down)."""
        def finished() -> bool:
            run = self._find(self._trial_tags(number))
            return run is not None and run.info.status != "RUNNING" and run.info.lifecycle_stage == "active"

        return bool(self._safely("lookup of a tuning trial", finished))

    def log_trial(self, trial, metric: str, nfe: int, study_tags: dict) -> str | None:
        return self._safely("logging of a tuning trial", self._log_trial, trial, metric, nfe, study_tags)

    def _study_parent(self, study_tags: dict) -> str:
        tags = {k: str(v)[:500] for k, v in study_tags.items()}
        now = _ms(datetime.datetime.now().timestamp())
        spec = RunSpec(find={"kind": "study", "optuna_study": self.study}, name=f"study-{self.study}",
                       start_ms=now, end_ms=now, digest=short_hash({"study": self.study}), tags=tags)
        return self._ensure(spec, "study")  # finished at once: children still attach to it

    def _log_trial(self, trial, metric: str, nfe: int, study_tags: dict) -> str:
        parent = self._study_parent({**study_tags, "objective": f"{metric} at nfe={nfe}"})
        number = str(trial.number)
        tags = {"mlflow.parentRunId": parent, "state": trial.state.name,
                "train_key": trial.system_attrs.get("bench:train_key", ""),
                "eval_key": trial.system_attrs.get("bench:eval_key", "")}
        if trial.user_attrs.get("fail_reason"):
            tags["fail_reason"] = trial.user_attrs["fail_reason"][:500]
        start = trial.datetime_start or trial.datetime_complete or datetime.datetime.now()
        end = trial.datetime_complete or start
        metrics = [(f"{metric}_intermediate", float(v), _ms(end.timestamp()), int(step))
                   for step, v in sorted(trial.intermediate_values.items())]
        if trial.value is not None:
            metrics.append((f"{metric}_nfe{nfe}", float(trial.value), _ms(end.timestamp()), 0))
        content = {"value": trial.value, "params": trial.params,
                   "intermediate": sorted(trial.intermediate_values.items()),
                   **{k: v for k, v in tags.items() if k != "mlflow.parentRunId"}}
        spec = RunSpec(find=self._trial_tags(trial.number), name=f"{self.study}-trial-{number}",
                       start_ms=_ms(start.timestamp()), end_ms=_ms(end.timestamp()),
                       digest=short_hash(content), tags=tags, params=dict(trial.params), metrics=metrics,
                       status="FAILED" if trial.state.name == "FAIL" else "FINISHED")
        return self._ensure(spec, "trial")
