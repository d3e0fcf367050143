"""Where MLflow records go: SQLite database + artifacts inside mlruns/ (MLflow 3 no longer accepts
the plain ./mlruns file store); MLFLOW_TRACKING_URI overrides. Shared by training (rank 0),
evaluation and the latency benchmark; concurrent writers (a sweep) are serialised and retried."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from data_pipeline.errors import UserError, first_line
from data_pipeline.images import check_output_folder

from .artifacts import file_sha256

DEFAULT_DIR = Path("mlruns")
RECORD = "mlflow_record.jsonl"  # a run recorded without MLflow (train.loop.tracking.RecordTracker)
# "Creating initial MLflow database tables..." in the middle of a run's log: MLflow's news, not the run's
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
CALL_TIMEOUT_S = 120.0  # the longest wait for one call (MLflow's retries take minutes, 20 for a hung server)


def default_tracking_uri(directory: Path = DEFAULT_DIR) -> str:
    return f"sqlite:///{directory.resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str = "", create: bool = True) -> str:
    """The store's URI; with create=False (readers) a SQLite store that does not exist yet is an
    error instead of a new empty database."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not create and not db.is_file():
            raise UserError(f"no MLflow store at {db} (train a model first, or point MLFLOW_TRACKING_URI at the store)")
        if create:
            try:
                check_output_folder(db.parent)
            except UserError as exc:
                raise UserError(f"MLflow store {uri} cannot be used: {exc}") from None
    elif uri.startswith(("http://", "https://")):
        check_server(uri)
    return uri


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """A tracking server that does not answer, said in seconds: MLflow's own retries take minutes
    (4 for a refused connection) before they give up."""
    where = urlsplit(uri)
    host, port = where.hostname, where.port or (443 if where.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__  # "timed out" has no strerror
        raise UserError(f"MLflow store {uri} cannot be used: no server answers at {host}:{port} ({reason}): "
                        "is its `mlflow server` running?") from None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts next to a SQLite database (mlruns/artifacts/<experiment>), else the server's default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts" / experiment).as_uri()
    return None


def retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite allows one writer at a time; concurrent runs (a sweep) retry on 'database is locked'."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MlflowException / OperationalError wrap the lock error
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)


def within(seconds: float, call, setting: str = ""):
    """call(), or TimeoutError once it has taken `seconds` (it goes on in a daemon thread, which the
    process does not wait for at exit); `setting` names what sets the limit."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            result["error"] = exc
    thread = threading.Thread(target=run, daemon=True, name="mlflow-call")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {seconds:g} s" + (f" ({setting})" if setting else ""))
    if "error" in result:
        raise result["error"]
    return result.get("value")


def call(fn, *args, **kwargs):
    """fn(*args, **kwargs) against the store: retried while SQLite is locked, at most CALL_TIMEOUT_S."""
    return within(CALL_TIMEOUT_S, lambda: retry(fn, *args, **kwargs))


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


def run_for(offline_run_id: str) -> str | None:
    """The store's run that stands for a run recorded elsewhere (tag offline_run_id): imported from
    an offline record, or made from a shipped file's record (train.ship --register), if any."""
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri())
    found = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.offline_run_id = '{offline_run_id}'",
                               output_format="list")
    return found[0].info.run_id if found else None


def latency_metric(backend: str, device: str, batch: int, height: int, width: int) -> str:
    """The MLflow name of a latency p50 (export/latency.py writes it, train.compare reads it), e.g.
    latency_p50_ms_torch_fp32_1x512x512 on CPU, latency_p50_ms_cuda_torch_fp32_1x512x512 on GPU."""
    name = backend.replace(" ", "_").replace(".", "_")
    return f"latency_p50_ms_{'cuda_' if device == 'cuda' else ''}{name}_{batch}x{height}x{width}"


def _record_of(out: Path | None, run_id: str) -> Path | None:
    """The offline record of run `run_id` in folder `out`, if it holds one."""
    if out is None or not (path := Path(out) / RECORD).is_file():
        return None
    with open(path) as f:
        return path if json.loads(f.readline() or "{}").get("start", {}).get("run_id") == run_id else None


def append_to_record(out: Path, run_id: str, metrics: dict[str, float]) -> str | None:
    """Metrics added to the offline record of run `run_id` in folder `out`, as the run's own
    tracker writes them: they go into the store with the record (train.import_run). None when
    `out` holds no record of that run."""
    path = _record_of(out, run_id)
    if path is None:
        return None
    with open(path, "a") as f:
        f.write(json.dumps({"metrics": {k: float(v) for k, v in metrics.items()}, "step": 0, "time": time.time()}) + "\n")
    return f"recorded {len(metrics)} metrics to {path} (run {run_id}; python -m train.import_run {out})"


def _destination(run_id: str | None, record_dir: Path | None) -> str | None:
    """The store's run that metrics for the checkpoint's `run_id` go to, or None for its offline
    record in `record_dir` (a GPU machine without MLflow, the run not imported yet); a UserError
    says why they can go nowhere."""
    if not run_id:
        raise UserError("the checkpoint names no run")
    has_mlflow = importlib.util.find_spec("mlflow") is not None
    if run_id.startswith("offline-") and _record_of(record_dir, run_id) and not (has_mlflow and run_for(run_id)):
        return None
    if not has_mlflow:
        raise UserError("it is not installed")
    import mlflow

    uri = resolve_tracking_uri(create=False)  # the run is in a store that exists, or in none
    mlflow.set_tracking_uri(uri)
    if run_id.startswith("offline-"):  # recorded without MLflow: the run it was imported as
        imported = run_for(run_id)
        if imported is None:
            raise UserError(f"run {run_id} was recorded offline and not imported (python -m train.import_run)")
        run_id = imported
    try:
        call(mlflow.MlflowClient().get_run, run_id)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        stand_in = run_for(run_id)
        if stand_in is None:
            raise UserError(f"run {run_id} is not in the store {uri} (a model trained against another store: "
                            "point MLFLOW_TRACKING_URI at that one)") from None
        run_id = stand_in
    return run_id


def unloggable(run_id: str | None, record_dir: Path | None = None) -> str | None:
    """Why log_to_run could not log to the checkpoint's run now, or None: said before minutes of work."""
    try:
        _destination(run_id, record_dir)
    except UserError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a store that does not answer
        return f"run {run_id}: {first_line(exc)}"
    return None


def log_to_run(run_id: str | None, metrics: dict[str, float], files: list[Path] = (), artifact_path: str | None = None,
               record_dir: Path | None = None) -> str:
    """Metrics (and files) added to an existing run, e.g. the checkpoint's training run; returns
    what happened, in one line (a store without that run is said, not raised). A run recorded
    offline and not imported yet (a GPU machine without MLflow) gets the metrics in its record in
    `record_dir` (the checkpoint's folder), the files staying where they are."""
    try:
        target = _destination(run_id, record_dir)
        if target is None:
            return append_to_record(record_dir, run_id, metrics)
        import mlflow

        client = mlflow.MlflowClient()
        stamp = int(time.time() * 1000)
        call(client.log_batch, target, [mlflow.entities.Metric(k, float(v), stamp, 0) for k, v in metrics.items()])
        for f in files:
            call(client.log_artifact, target, str(f), artifact_path)
    except UserError as exc:  # a store that cannot be used, e.g. a server that does not answer
        return f"not logged to MLflow: {exc}"
    except Exception as exc:  # noqa: BLE001 - a store that does not answer
        return f"not logged to MLflow run {run_id}: {first_line(exc)}"
    return f"logged {len(metrics)} metrics to MLflow run {target}"


SHIPPED_ALIAS = "shipped"


def register_shipped(run_id: str | None, model_file: Path, tags: dict[str, str]) -> str:
    """A shipped model file as a new version of the registered model named by its stem, tagged with
    `tags` and its SHA-256, with the alias `shipped` on it: the file is logged to its training run (artifacts `shipped/<name>/<the
    first 12 digits of its SHA-256>/`, so a second ship of the same run keeps the first's bytes), so
    the MLflow UI's Models page lists what was shipped when and from which run, and a version stays
    usable after the file is replaced (`--checkpoint models:/<name>/<version>`: checkpoint_path).
    One line on what happened; a checkpoint whose run is not in the store is said, not raised."""
    name = Path(model_file).stem
    try:
        target = _destination(run_id, None)
        import mlflow

        client = mlflow.MlflowClient()
        sha256 = file_sha256(model_file)
        now = _shipped_version(client, name)
        if now is not None and now.tags.get("sha256") == sha256:
            return f"{Path(model_file).name} is {name} version {now.version} in MLflow already (alias {SHIPPED_ALIAS}), from run {now.run_id}"
        folder = f"shipped/{name}/{sha256[:12]}"
        call(client.log_artifact, target, str(model_file), folder)
        try:
            call(client.create_registered_model, name,
                 description=f"{Path(model_file).name} as `python -m train.ship` wrote it; alias {SHIPPED_ALIAS}: the one shipped now")
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = call(client.create_model_version, name, f"runs:/{target}/{folder}", target, tags={**tags, "sha256": sha256})
        call(client.set_registered_model_alias, name, SHIPPED_ALIAS, version.version)
    except UserError as exc:
        return f"not registered in MLflow: {exc}"
    except Exception as exc:  # noqa: BLE001 - a store that does not answer
        return f"not registered in MLflow (run {run_id}): {first_line(exc)}"
    return f"registered in MLflow as {name} version {version.version} (alias {SHIPPED_ALIAS}), from run {target}"


def _shipped_version(client, name: str):
    """The model version that the alias `shipped` of registered model `name` is on, or None."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, SHIPPED_ALIAS)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def shipped_runs(client) -> dict[str, list[str]]:
    """{run id: the registered models whose `shipped` version came from it} in the client's store."""
    found: dict[str, list[str]] = {}
    for model in client.search_registered_models():
        if SHIPPED_ALIAS in model.aliases:
            version = client.get_model_version(model.name, model.aliases[SHIPPED_ALIAS])
            found.setdefault(version.run_id, []).append(model.name)
    return found


REGISTRY_DIR = Path("outputs/registry")  # registered versions downloaded once: a version's file never changes


def checkpoint_path(value: str, cache: Path = REGISTRY_DIR) -> Path:
    """A command's checkpoint argument: a file, or a registered model version as MLflow names it,
    `models:/<name>/<version>` or `models:/<name>@<alias>` (`models:/image_compression_model@shipped`),
    whose file is downloaded once into outputs/registry/<name>/<version>/."""
    if not value.startswith("models:/"):
        return Path(value)
    import mlflow

    ref = value[len("models:/"):]
    name, by_alias, alias = ref.partition("@")
    number = ""
    if not by_alias:
        name, _, number = ref.rpartition("/")
    if not name or not (alias or number.isdigit()):
        raise UserError(f"{value}: a registered model is models:/<name>/<version> or models:/<name>@<alias>")
    uri = resolve_tracking_uri(create=False)
    client = mlflow.MlflowClient(uri)
    try:
        version = call(client.get_model_version_by_alias, name, alias) if alias else call(client.get_model_version, name, number)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"{value}: {first_line(exc)} (store {uri})") from None
    folder = cache / name / str(version.version)
    if not folder.is_dir():
        check_output_folder(cache)
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")  # renamed when complete
        call(mlflow.artifacts.download_artifacts, f"models:/{name}/{version.version}", dst_path=str(partial), tracking_uri=uri)
        try:
            partial.rename(folder)
        except OSError:  # another process got it there first
            shutil.rmtree(partial, ignore_errors=True)
    files = sorted(folder.glob("*.pth"))
    if len(files) != 1:
        raise UserError(f"{value}: version {version.version} holds {len(files)} .pth files in {folder}, not one")
    return files[0]
