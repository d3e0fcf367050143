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

from data_pipeline.errors import UserError
from runtime.device import device_name
from runtime.mlflow_store import RECORD, artifact_location, resolve_tracking_uri, retry, store_lock

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


def system_tags(device, world_size: int, precision: str) -> dict[str, str]:
    import torch

    tags = {"device": str(device), "device_name": device_name(device),
            "world_size": str(world_size), "precision": precision, "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(), "cpu_threads": str(torch.get_num_threads())}
    for name, module in (("dali", "nvidia.dali"), ("mlflow", "mlflow")):
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
    return Tracker(enabled, **kwargs)


class RecordTracker:
    """The Tracker interface, appending one JSON event per call to a record file (no MLflow)."""

    enabled = True

    def __init__(self, path: Path, run_id: str | None = None, run_name: str = "", experiment: str = "", tags: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resumed = bool(run_id and run_id.startswith("offline-") and self.path.is_file())
        self.run_id = run_id if resumed else f"offline-{uuid.uuid4().hex}"
        if not resumed:
            self._event(start={"run_id": self.run_id, "run_name": run_name, "experiment": experiment})
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
        self._event(status=status)


class Tracker:
    """A thin MLflow wrapper; disabled (all calls no-ops) on ranks other than 0 or by config."""

    def __init__(self, enabled: bool, experiment: str = "", run_name: str = "", tracking_uri: str = "",
                 run_id: str | None = None, tags: dict | None = None):
        self.enabled, self.run_id = enabled, None
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        remedy = "fix tracking.tracking_uri or MLFLOW_TRACKING_URI, or record the run without MLflow: --set tracking.offline=true"
        try:
            self.uri = resolve_tracking_uri(tracking_uri)
        except UserError as exc:
            raise UserError(f"{exc} ({remedy})") from None
        mlflow.set_tracking_uri(self.uri)
        try:
            self.run_id = self._start(experiment, run_name, run_id, tags)
        except Exception as exc:  # noqa: BLE001 - the store's own (MlflowException, SQLAlchemy's, HTTP's)
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise UserError(f"MLflow store {self.uri} cannot be used: {reason} ({remedy})") from None

    def _start(self, experiment: str, run_name: str, run_id: str | None, tags: dict | None) -> str:
        mlflow = self.mlflow
        with store_lock(self.uri):
            client = mlflow.MlflowClient()
            exp = retry(client.get_experiment_by_name, experiment)
            if exp is None:
                exp_id = retry(client.create_experiment, experiment, artifact_location=artifact_location(self.uri, experiment))
            else:
                exp_id = exp.experiment_id
            run = None
            if run_id:
                try:
                    run = retry(mlflow.start_run, run_id=run_id)
                    log.info("resuming MLflow run %s", run_id)
                except Exception as exc:  # noqa: BLE001
                    log.warning("cannot resume MLflow run %s (%s); starting a new run", run_id, str(exc).splitlines()[0])
            if run is None:
                run = retry(mlflow.start_run, experiment_id=exp_id, run_name=run_name or None, tags=tags)
        return run.info.run_id

    def log_params(self, params: dict) -> None:
        if self.enabled:
            items = list(params.items())
            for i in range(0, len(items), 100):
                try:
                    retry(self.mlflow.log_params, dict(items[i:i + 100]))
                except Exception as exc:  # noqa: BLE001 - a resumed run already has them
                    log.debug("params not logged: %s", exc)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            retry(self.mlflow.set_tags, tags)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.enabled:
            retry(self.mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            retry(self.mlflow.log_artifact, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.enabled and self.mlflow.active_run() is not None:
            retry(self.mlflow.end_run, status)
