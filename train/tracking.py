"""MLflow tracking, rank 0 only. Default store: SQLite database + artifacts inside mlruns/
(MLflow 3 no longer accepts the plain ./mlruns file store); MLFLOW_TRACKING_URI overrides."""
from __future__ import annotations

import fcntl
import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("mlruns")


def default_tracking_uri(directory: Path = DEFAULT_DIR) -> str:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def resolve_tracking_uri(configured: str = "") -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts next to a SQLite database (mlruns/artifacts/<experiment>), else the server's default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts" / experiment).as_uri()
    return None


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite allows one writer at a time; concurrent runs (a sweep) retry on 'database is locked'."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MlflowException / OperationalError wrap the lock error
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)


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

    tags = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "world_size": str(world_size), "precision": precision, "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(), "cpu_threads": str(torch.get_num_threads())}
    for name, module in (("dali", "nvidia.dali"), ("mlflow", "mlflow")):
        try:
            tags[name] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            pass
    return tags


@contextmanager
def store_lock(uri: str):
    """Serialises creating the SQLite schema and experiment across processes (a sweep's tasks
    start together); a no-op for other stores."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tracker:
    """A thin MLflow wrapper; disabled (all calls no-ops) on ranks other than 0 or by config."""

    def __init__(self, enabled: bool, experiment: str = "", run_name: str = "", tracking_uri: str = "",
                 run_id: str | None = None, tags: dict | None = None):
        self.enabled, self.run_id = enabled, None
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        self.uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(self.uri)
        with store_lock(self.uri):
            client = mlflow.MlflowClient()
            exp = _retry(client.get_experiment_by_name, experiment)
            if exp is None:
                exp_id = _retry(client.create_experiment, experiment, artifact_location=_artifact_location(self.uri, experiment))
            else:
                exp_id = exp.experiment_id
            run = None
            if run_id:
                try:
                    run = _retry(mlflow.start_run, run_id=run_id)
                    log.info("resuming MLflow run %s", run_id)
                except Exception as exc:  # noqa: BLE001
                    log.warning("cannot resume MLflow run %s (%s); starting a new run", run_id, str(exc).splitlines()[0])
            if run is None:
                run = _retry(mlflow.start_run, experiment_id=exp_id, run_name=run_name or None, tags=tags)
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        if self.enabled:
            items = list(params.items())
            for i in range(0, len(items), 100):
                try:
                    _retry(self.mlflow.log_params, dict(items[i:i + 100]))
                except Exception as exc:  # noqa: BLE001 - a resumed run already has them
                    log.debug("params not logged: %s", exc)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            _retry(self.mlflow.set_tags, tags)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.enabled:
            _retry(self.mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            _retry(self.mlflow.log_artifact, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.enabled and self.mlflow.active_run() is not None:
            _retry(self.mlflow.end_run, status)
