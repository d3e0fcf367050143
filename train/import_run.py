"""Put a training run recorded without MLflow (`<out>/mlflow_record.jsonl`: a GPU machine without
MLflow, or `tracking.offline = true`) into the MLflow store: params, tags, every metric with its
step and time, status and artifacts (files under <out>, which travel with the record).

    python -m train.import_run outputs/gpu-run [--experiment jpeg-gpu] [--tag gpu=H100]

The new run is tagged `offline_run_id`, so the checkpoint's recorded run id still finds it
(`train.evaluate --log-mlflow`); importing the same record twice is refused (of several run folders,
one already in the store, or one that cannot be imported, is a reported skip); a record without an end
(its process killed) makes a KILLED run. A record that
continues an MLflow run (its store stopped answering during training) goes into that run; a later
import adds what was recorded since.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipeline.errors import UserError, command
from runtime.mlflow_store import artifact_location, resolve_tracking_uri, retry, run_for, store_lock

from .loop.tracking import RECORD

IMPORTED = "record_events_imported"  # on a run that a record continues: how many of its events the run holds


class AlreadyImported(UserError):
    """The record is in the store already: importing a folder of records again passes over it."""


def read_record(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"no run record {path} (a run recorded without MLflow writes one)")
    events, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines):  # only the last line may be cut by a kill
                raise UserError(f"{path}: line {i} is not JSON") from None
            print(f"note: the last line of {path} is cut (its writer was killed mid-line): left out", file=sys.stderr)
    if not events or "start" not in events[0]:
        raise UserError(f"{path} does not start with a run record")
    return events


def import_run(out: Path, experiment: str | None = None, extra_tags: dict | None = None) -> str:
    """The id of the MLflow run made (or continued) from `out`'s record."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    recorded = read_record(out / RECORD)
    start = recorded[0]["start"]
    uri = resolve_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    if start.get("continues"):
        rid = start["continues"]
        try:
            done = int(retry(client.get_run, rid).data.tags.get(IMPORTED, 0))
        except Exception:  # noqa: BLE001 - MlflowException: no such run
            raise UserError(f"{out / RECORD} continues MLflow run {rid}, which the store {uri} does not hold") from None
        events = recorded[done:]
        if not events:
            raise AlreadyImported(f"{out / RECORD} is already in the store: run {rid} holds all its {done} events")
        tags, status = dict(extra_tags or {}), None
    else:
        if run_for(start["run_id"]):
            raise AlreadyImported(f"{out / RECORD} is already in the store as run {run_for(start['run_id'])}")
        name = experiment or start["experiment"] or "jpeg-restore"
        with store_lock(uri):
            exp = retry(client.get_experiment_by_name, name)
            exp_id = exp.experiment_id if exp else retry(client.create_experiment, name, artifact_location=artifact_location(uri, name))
        rid = retry(client.create_run, exp_id, start_time=int(recorded[0]["time"] * 1000), run_name=start["run_name"] or None).info.run_id
        events, tags, status = recorded, {"offline_run_id": start["run_id"], **(extra_tags or {})}, None
    params, metrics, artifacts = {}, [], []
    for e in events:
        tags.update(e.get("tags", {}))
        params.update(e.get("params", {}))
        metrics += [Metric(k, v, int(e["time"] * 1000), e.get("step", 0)) for k, v in e.get("metrics", {}).items()]
        if "artifact" in e:
            artifacts.append((e["artifact"], e.get("artifact_path")))
        status = e.get("status", status)
    retry(client.log_batch, rid, params=[Param(k, v) for k, v in params.items()], tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for i in range(0, len(metrics), 1000):
        retry(client.log_batch, rid, metrics=metrics[i:i + 1000])
    missing = []
    for rel, where in artifacts:
        path = Path(rel) if Path(rel).is_absolute() else out / rel
        if not path.exists():
            missing.append(rel)
        elif path.is_dir():
            retry(client.log_artifacts, rid, str(path), where)
        else:
            retry(client.log_artifact, rid, str(path), where)
    if status in (None, "RUNNING") and not start.get("continues"):
        status = "KILLED"  # not FINISHED: a run killed at step 74 of 100000 looked complete
        print(f"note: {out / RECORD} has no end (its process was killed, or was still running when the record was "
              f"copied): the run is marked KILLED at its last event", file=sys.stderr)
    if status not in (None, "RUNNING"):  # a record that continues a run and has not ended yet leaves it running
        retry(client.set_terminated, rid, status, end_time=int(events[-1]["time"] * 1000))
    if start.get("continues"):  # last: an import cut short is done again
        retry(client.set_tag, rid, IMPORTED, str(len(recorded)))
    for rel in missing:
        print(f"artifact {rel} is not in {out}: not imported", file=sys.stderr)
    return rid


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders holding mlflow_record.jsonl")
    ap.add_argument("--experiment", help="MLflow experiment (default: the one the run was recorded for)")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra tag, e.g. gpu=H100 (repeatable)")
    args = ap.parse_args(argv)
    tags = {}
    for t in args.tag:
        if "=" not in t:
            raise UserError(f"--tag {t!r} must look like key=value")
        k, v = t.split("=", 1)
        tags[k] = v
    failed = 0
    for out in args.runs:
        try:
            rid = import_run(out, args.experiment, tags)
        except UserError as exc:  # of several runs (docs/results/gpu/runs/*/), the others are still imported
            if len(args.runs) == 1:
                raise
            print(f"skipped {out}: {exc}", file=sys.stderr)
            failed += not isinstance(exc, AlreadyImported)
            continue
        print(f"imported {out / RECORD} as MLflow run {rid} into {resolve_tracking_uri()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
