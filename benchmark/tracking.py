"""MLflow mirror of the results on disk.

One parent run per training key (parameters, training curve, tags to filter by method,
model and data) and one nested run per evaluation (nfe, guidance, every metric, the
sample grid as an artifact).  Only the driver process logs (jobs write records to disk),
so parallel jobs never race on the store.  The disk records stay the record of truth: a
tracking failure (a server that is down) prints one warning, the benchmark goes on, and
``python -m benchmark.sync`` mirrors the records later.  What was mirrored to which
tracking URI is kept in ``runs/<train_key>/mlflow.json``, so nothing is logged twice.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from benchmark.keys import short_hash
from benchmark.schema import TrackingConfig
from benchmark.store import Store, atomic_write_json


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class Tracker:
    def __init__(self, cfg: TrackingConfig, store: Store, sweep: str = "") -> None:
        """``sweep``: the command's overrides; runs get tags ``sweep`` (a short hash of them,
        for filtering in the UI) and ``sweep_overrides`` from the command that first logged them."""
        self.cfg, self.store = cfg, store
        self.sweep_tags = {"sweep": short_hash(sweep), "sweep_overrides": sweep[:500]} if sweep else {}
        self.uri = cfg.uri or store.mlflow_uri()
        self._client = None
        self._experiment_id: str | None = None
        self.down = False
        if self.uri.startswith("http"):
            # fail in seconds, not minutes of retries, when the server is down
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    # -- plumbing ------------------------------------------------------------------------
    def _connect(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            self._experiment_id = self._experiment()
        return self._client

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self._client
        found = client.get_experiment_by_name(self.cfg.experiment)
        if found is not None:
            return found.experiment_id
        try:
            location = self.store.mlflow_artifacts().as_uri() if not self.cfg.uri else None
            return client.create_experiment(self.cfg.experiment, artifact_location=location)
        except MlflowException:  # another job created it first
            return client.get_experiment_by_name(self.cfg.experiment).experiment_id

    def _ledger_path(self, train_key: str) -> Path:
        return self.store.run_dir(train_key) / "mlflow.json"

    def _ledger(self, train_key: str) -> dict:
        """What was mirrored to *this* tracking URI (a run may be mirrored to several)."""
        path = self._ledger_path(train_key)
        ledgers = json.loads(path.read_text()) if path.is_file() else {}
        return ledgers.get(self.uri, self._empty_ledger())

    def _empty_ledger(self) -> dict:
        return {"evals": {}}

    def _save_ledger(self, train_key: str, ledger: dict) -> None:
        path = self._ledger_path(train_key)
        ledgers = json.loads(path.read_text()) if path.is_file() else {}
        ledgers[self.uri] = ledger
        atomic_write_json(path, ledgers)

    def _safely(self, what: str, fn, *args):
        if not self.cfg.enabled or self.down:
            return None
        try:
            return fn(*args)
        except Exception as err:  # the disk record is the truth; tracking must not fail a run
            self.down = True  # one warning, no per-record timeouts against a dead server
            print(f"warning: MLflow {what} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                  f"results are on disk under {self.store.root}: mirror them later with "
                  f"`python -m benchmark.sync results_dir={self.store.root}`", file=sys.stderr)
            return None

    # -- public --------------------------------------------------------------------------
    def log_training(self, train_key: str, identity: dict, curve: list, seconds: float | None) -> str | None:
        return self._safely("logging of training", self._log_training, train_key, identity, curve, seconds)

    def log_evaluation(self, train_key: str, identity: dict, record: dict) -> str | None:
        return self._safely("logging of evaluation", self._log_evaluation, train_key, identity, record)

    def _log_training(self, train_key: str, identity: dict, curve: list, seconds: float | None) -> str:
        """The parent run of one training, from its identity (the resolved training config)."""
        ledger = self._ledger(train_key)
        if ledger.get("parent"):
            return ledger["parent"]
        from mlflow.entities import Metric, Param, RunTag

        client = self._connect()
        method, model = identity["method"]["name"], identity["model"]["name"]
        steps = identity["train"]["steps"]
        tags = {"method": method, "model": model, "data": identity["data"]["name"],
                "train_key": train_key, "seed": str(identity["seed"]), "kind": "training", **self.sweep_tags}
        run = client.create_run(self._experiment_id, run_name=f"{method}-{model}-{train_key}", tags=tags)
        params = [Param(k, str(v)[:500]) for k, v in flatten(identity).items()]
        metrics = [Metric("train_loss", float(loss), 0, int(step)) for step, loss, _ in curve]
        metrics += [Metric("lr", float(lr), 0, int(step)) for step, _, lr in curve]
        if seconds is not None:
            metrics.append(Metric("train_seconds", float(seconds), 0, steps))
        for i in range(0, max(len(params), len(metrics), 1), 900):
            client.log_batch(run.info.run_id, metrics=metrics[i:i + 900], params=params[i:i + 90],
                             tags=[RunTag("train_steps", str(steps))] if i == 0 else [])
        client.set_terminated(run.info.run_id)
        ledger["parent"] = run.info.run_id
        self._save_ledger(train_key, ledger)
        return run.info.run_id

    def _log_evaluation(self, train_key: str, identity: dict, record: dict) -> str:
        ledger = self._ledger(train_key)
        if record["eval_key"] in ledger["evals"]:
            return ledger["evals"][record["eval_key"]]
        parent = ledger.get("parent") or self._log_training(train_key, identity, [], None)
        ledger = self._ledger(train_key)
        from mlflow.entities import Metric, Param

        client = self._connect()
        tags = {"mlflow.parentRunId": parent, "method": record["method"], "model": record["model"],
                "data": record["data"], "nfe": str(record["nfe"]), "guidance": str(record["guidance"]),
                "train_key": record["train_key"], "eval_key": record["eval_key"], "kind": "evaluation",
                **self.sweep_tags}
        run = client.create_run(self._experiment_id,
                                run_name=f"{record['method']}-nfe{record['nfe']}-w{record['guidance']:g}",
                                tags=tags)
        params = {"nfe": record["nfe"], "guidance": record["guidance"], "num_samples": record["num_samples"],
                  **flatten(record["method_eval"], "method.")}
        values = {**record["metrics"], "nfe_counted": record["nfe_counted"],
                  "sec_per_sample": record["sec_per_sample"], "metric_seconds": record["metric_seconds"]}
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric(k, float(v), 0, 0) for k, v in values.items()
                                  if isinstance(v, (int, float))])
        grid = self.store.grid_path(record["train_key"], record["eval_key"])
        if grid.is_file():
            client.log_artifact(run.info.run_id, str(grid), artifact_path="samples")
        client.set_terminated(run.info.run_id)
        ledger["evals"][record["eval_key"]] = run.info.run_id
        self._save_ledger(train_key, ledger)
        return run.info.run_id


class StudyTracker(Tracker):
    """An Optuna study in MLflow: one parent run per study, one child run per finished
    trial (its parameters, the objective, the intermediate values by training step, tags
    with the study, the trial number and state, and the benchmark run's keys).  What was
    logged to which tracking URI is kept in ``tune/<study>/mlflow.json``."""

    def __init__(self, cfg: TrackingConfig, store: Store, study: str, study_dir: Path) -> None:
        super().__init__(cfg, store, sweep=f"study {study}")
        self.study, self.study_dir = study, study_dir

    def _ledger_path(self, train_key: str) -> Path:  # one ledger for the study
        return self.study_dir / "mlflow.json"

    def _empty_ledger(self) -> dict:
        return {"parent": None, "trials": {}}

    def has_trial(self, number: int) -> bool:
        return str(number) in self._ledger("")["trials"]

    def log_trial(self, trial, metric: str, nfe: int, study_tags: dict) -> str | None:
        return self._safely("logging of a tuning trial", self._log_trial, trial, metric, nfe, study_tags)

    def _study_parent(self, study_tags: dict) -> str:
        ledger = self._ledger("")
        if ledger.get("parent"):
            return ledger["parent"]
        client = self._connect()
        tags = {"kind": "study", "optuna_study": self.study, **{k: str(v)[:500] for k, v in study_tags.items()}}
        run = client.create_run(self._experiment_id, run_name=f"study-{self.study}", tags=tags)
        client.set_terminated(run.info.run_id)  # children still attach; no run left "running"
        ledger["parent"] = run.info.run_id
        self._save_ledger("", ledger)
        return run.info.run_id

    def _log_trial(self, trial, metric: str, nfe: int, study_tags: dict) -> str:
        ledger = self._ledger("")
        number = str(trial.number)
        if number in ledger["trials"]:
            return ledger["trials"][number]
        from mlflow.entities import Metric, Param

        parent = self._study_parent({**study_tags, "objective": f"{metric} at nfe={nfe}"})
        ledger = self._ledger("")
        client = self._connect()
        tags = {"mlflow.parentRunId": parent, "kind": "trial", "optuna_study": self.study,
                "optuna_trial": number, "state": trial.state.name,
                "train_key": trial.system_attrs.get("bench:train_key", ""),
                "eval_key": trial.system_attrs.get("bench:eval_key", "")}
        if trial.user_attrs.get("fail_reason"):
            tags["fail_reason"] = trial.user_attrs["fail_reason"][:500]
        run = client.create_run(self._experiment_id, run_name=f"{self.study}-trial-{number}", tags=tags)
        metrics = [Metric(f"{metric}_intermediate", float(v), 0, int(step))
                   for step, v in sorted(trial.intermediate_values.items())]
        if trial.value is not None:
            metrics.append(Metric(f"{metric}_nfe{nfe}", float(trial.value), 0, 0))
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param(k, str(v)[:500]) for k, v in trial.params.items()])
        client.set_terminated(run.info.run_id, status="FAILED" if trial.state.name == "FAIL" else "FINISHED")
        ledger["trials"][number] = run.info.run_id
        self._save_ledger("", ledger)
        return run.info.run_id
