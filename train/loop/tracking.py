"""MLflow tracking of a training run, rank 0 only (the store: runtime/mlflow_store.py). Where
MLflow is not installed (a lent GPU machine) or `tracking.offline` is set, the run is recorded to
`<out>/mlflow_record.jsonl` instead, and `python -m train.import_run <out>` puts it into a store."""
from __future__ import annotations

import importlib.util
import json
import logging
import platform
import time
import uuid
from pathlib import Path

from data_pipeline.errors import UserError, first_line
from runtime.mlflow_store import CALL_TIMEOUT_S, RECORD, artifact_location, resolve_tracking_uri, retry, store_lock, within

log = logging.getLogger(__name__)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def system_tags(device, world_size: int, precision: str, loader: str) -> dict[str, str]:
    import torch  # here, not above: train.import_run and the record need no torch (1.2 s)

    from runtime.device import device_name

    tags = {"device": str(device), "device_name": device_name(device),
            "world_size": str(world_size), "precision": precision, "loader": loader, "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(), "cpu_threads": str(torch.get_num_threads())}
    # DALI's version where the run's loader is DALI's: imported for a tag alone, it cost rank 0 0.3 s and 66 MB
    for name, module in [("mlflow", "mlflow")] + ([("dali", "nvidia.dali")] if loader == "dali" else []):
        try:
            tags[name] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            pass
    return tags


def make_tracker(enabled: bool, out: Path, offline: bool = False, **kwargs) -> "Tracker | RecordTracker":
    """An MLflow tracker, or a record in `out` when MLflow is missing or offline is asked for."""
    if enabled and (offline or importlib.util.find_spec("mlflow") is None):
        if not offline:
            log.warning("MLflow is not installed: recording this run to %s (python -m train.import_run %s)", out / RECORD, out)
        return RecordTracker(out / RECORD, run_id=kwargs.get("run_id"), run_name=kwargs.get("run_name", ""),
                             experiment=kwargs.get("experiment", ""), tags=kwargs.get("tags"))
    return Tracker(enabled, record=out / RECORD, **kwargs)


class RecordTracker:
    """The Tracker interface, appending one JSON event per call to a record file (no MLflow)."""

    enabled, ended = True, False

    def __init__(self, path: Path, run_id: str | None = None, run_name: str = "", experiment: str = "", tags: dict | None = None,
                 continues: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if continues:  # the rest of an MLflow run whose store stopped answering (Tracker)
            self.run_id = continues
            if not self.path.is_file():
                self._event(start={"run_id": f"offline-{uuid.uuid4().hex}", "continues": continues})
            return
        resumed = bool(run_id and run_id.startswith("offline-") and self.path.is_file())
        self.run_id = run_id if resumed else f"offline-{uuid.uuid4().hex}"
        if not resumed:
            self._event(start={"run_id": self.run_id, "run_name": run_name, "experiment": experiment})
        else:  # running again: a record cut before this session's end is not its last session's end
            self._event(status="RUNNING")
        self._event(tags=dict(tags or {}))

    def _event(self, **event) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**event, "time": time.time()}) + "\n")

    def log_params(self, params: dict) -> None:
        self._event(params={k: str(v) for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        self._event(tags={k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._event(metrics={k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if Path(path).exists():  # recorded relative to the run folder, which travels with the record
            rel = Path(path).resolve().relative_to(self.path.parent.resolve()) if Path(path).resolve().is_relative_to(
                self.path.parent.resolve()) else Path(path).resolve()
            self._event(artifact=str(rel), artifact_path=artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if not self.ended:  # once, as Tracker: a stopped run ends KILLED before Trainer.close
            self.ended = True
            self._event(status=status)


class Tracker:
    """A thin MLflow wrapper; disabled (all calls no-ops) on ranks other than 0 or by config. A store
    that fails during the run (after MLflow's own retries, or after `timeout_s`) does not stop the
    training: the rest of the run goes to `record`, which train.import_run adds to the same MLflow
    run once the store is back."""

    def __init__(self, enabled: bool, experiment: str = "", run_name: str = "", tracking_uri: str = "",
                 run_id: str | None = None, tags: dict | None = None, record: Path | None = None, timeout_s: float = CALL_TIMEOUT_S):
        self.enabled, self.run_id = enabled, None
        self.record_path, self.record, self.timeout_s = record, None, timeout_s
        if not enabled:
            return
        import mlflow

        remedy = "fix tracking.tracking_uri or MLFLOW_TRACKING_URI, or record the run without MLflow: --set tracking.offline=true"
        try:
            self.uri = resolve_tracking_uri(tracking_uri)
        except UserError as exc:
            raise UserError(f"{exc} ({remedy})") from None
        self.mlflow = mlflow
        try:
            self.run_id = within(self.timeout_s, lambda: self._start(experiment, run_name, run_id, tags), "tracking.timeout_s")
        except Exception as exc:  # noqa: BLE001 - the store's own (MlflowException, SQLAlchemy's, HTTP's)
            raise UserError(f"MLflow store {self.uri} cannot be used: {first_line(exc)} ({remedy})") from None
        self.ended = False

    def _start(self, experiment: str, run_name: str, run_id: str | None, tags: dict | None) -> str:
        from mlflow.tracking.context.registry import resolve_tags  # the source, user and git commit, as mlflow.start_run adds

        with store_lock(self.uri):  # the first client of a new SQLite store creates its schema
            # the client, not mlflow's active run: that one is ended at exit, which waits out a dead store's retries
            self.client = client = self.mlflow.MlflowClient(self.uri)
            exp = retry(client.get_experiment_by_name, experiment)
            if exp is None:
                exp_id = retry(client.create_experiment, experiment, artifact_location=artifact_location(self.uri, experiment))
            else:
                exp_id = exp.experiment_id
            if run_id:
                try:
                    retry(client.update_run, run_id, status="RUNNING")
                    log.info("resuming MLflow run %s", run_id)
                    return run_id
                except Exception as exc:  # noqa: BLE001
                    log.warning("cannot resume MLflow run %s (%s); starting a new run", run_id, first_line(exc))
            return retry(client.create_run, exp_id, tags=resolve_tags(tags or {}), run_name=run_name or None).info.run_id

    def _send(self, call, name: str, *args) -> None:
        """MLflow's `call`, or once the store has failed this run, the record's `name`(*args)."""
        if not self.enabled:
            return
        if self.record is None:
            try:
                within(self.timeout_s, call, "tracking.timeout_s")
                return
            except Exception as exc:  # noqa: BLE001 - the store's own (MlflowException, HTTP's, SQLAlchemy's)
                if self.record_path is None:
                    raise
                self.record = RecordTracker(self.record_path, continues=self.run_id)
                log.warning("MLflow store %s failed (%s): the rest of run %s is recorded to %s; once the store is back, "
                            "python -m train.import_run %s adds it to the run", self.uri,
                            first_line(exc), self.run_id, self.record_path,
                            self.record_path.parent)
        getattr(self.record, name)(*args)

    def _log_batch(self, **entities) -> None:
        retry(self.client.log_batch, self.run_id, **entities)

    # MLflow's entities are imported in the calls, which run only where tracking is enabled: the
    # other ranks of a DDP job never import MLflow (1.2 s of CPU and 120 MB each, after torch)
    def log_params(self, params: dict) -> None:
        def call():
            from mlflow.entities import Param

            items = [Param(k, str(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                try:
                    self._log_batch(params=items[i:i + 100])
                except Exception as exc:  # noqa: BLE001 - a resumed run already has them
                    log.debug("params not logged: %s", exc)
        self._send(call, "log_params", params)

    def set_tags(self, tags: dict) -> None:
        def call():
            from mlflow.entities import RunTag

            self._log_batch(tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self._send(call, "set_tags", tags)

    def log_metrics(self, metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)

        def call():
            from mlflow.entities import Metric

            self._log_batch(metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        self._send(call, "log_metrics", metrics, step)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._send(lambda: retry(self.client.log_artifact, self.run_id, str(path), artifact_path),
                       "log_artifact", path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.enabled and not self.ended:
            self.ended = True
            self._send(lambda: retry(self.client.set_terminated, self.run_id, status), "close", status)
