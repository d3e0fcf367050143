"""The MLflow store under concurrent writers (a sweep's tasks): no run and no metric lost; a
tracking server that goes away during a training costs it nothing."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import torch
from train_runs import MAIN, REPO, env_for, smoke_args

from data_pipeline.errors import UserError

WRITER = """
import sys
from train.loop.tracking import Tracker
t = Tracker(True, "concurrent", f"writer-{sys.argv[1]}", sys.argv[2], tags={"writer": sys.argv[1]})
t.log_params({f"p{i}": i for i in range(20)})
for step in range(60):
    t.log_metrics({"loss": 1.0 / (step + 1), "psnr": 20 + step * 0.1}, step)
t.close()
"""


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # fresh: the writers also race to create the schema
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), uri], stderr=subprocess.PIPE, text=True) for i in range(6)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-1500:] for e in errors)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["concurrent"], output_format="list")
    assert sorted(r.data.tags["writer"] for r in runs) == [str(i) for i in range(6)]
    client = mlflow.MlflowClient()
    for r in runs:
        assert r.info.status == "FINISHED" and len(r.data.params) == 20
        assert [m.step for m in sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)] == list(range(60))


def test_logging_to_a_run_of_another_store_says_so_and_creates_no_store(tmp_path, tiles_dir, monkeypatch, in_process):
    from runtime.mlflow_store import log_to_run

    db = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    said = log_to_run("0" * 32, {"latency_ms": 1.0})  # a fresh clone's shipped model: its run was in another store
    assert said == f"not logged to MLflow: no MLflow store at {db} (train a model first, or point MLFLOW_TRACKING_URI at the store)"
    assert not db.parent.exists()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("here"))
    assert log_to_run(run.info.run_id, {"latency_ms": 1.0}) == f"logged 1 metrics to MLflow run {run.info.run_id}"
    assert log_to_run("0" * 32, {"latency_ms": 1.0}) == (f"not logged to MLflow: run {'0' * 32} is not in the store "
                                                         f"sqlite:///{db} (a model trained against another store: point MLFLOW_TRACKING_URI at that one)")
    # evaluate --log-mlflow says so before evaluating (the shipped model's run is in no test store)
    from train.evaluate import main as evaluate_main

    proc = in_process(evaluate_main, "--dataset", tiles_dir, "--checkpoint", REPO / "image_compression_model.pth", "--log-mlflow", cwd=tmp_path)
    assert proc.returncode == 2 and not proc.stdout and proc.stderr.startswith("error: --log-mlflow: run "), proc.stderr[-2000:]
    assert "is not in the store" in proc.stderr


def test_the_disabled_tracker_of_the_other_ranks_never_imports_mlflow():
    """Ranks other than 0 hold a disabled Tracker and log through it like rank 0: MLflow's import
    (1.2 s of CPU and 120 MB a rank, after torch) is rank 0's alone."""
    code = ("import sys; from train.loop.tracking import Tracker; t = Tracker(False); t.log_params({'a': 1}); "
            f"t.set_tags({{'b': 2}}); t.log_metrics({{'c': 3.0}}, 1); t.log_artifact({str(__file__)!r}); t.close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout[-2000:] + proc.stderr[-2000:]


def test_import_run_starts_without_torch():
    """train.import_run reads a record into MLflow: it imported torch (1.2 s) through the tracker's module."""
    code = "import sys, train.import_run; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout[-2000:] + proc.stderr[-2000:]


def test_compare_of_an_experiment_not_in_the_store_names_those_that_are(tmp_path, monkeypatch):
    """After the quickstart (experiment jpeg-restore) `train.compare` asks for the sweep's jpeg-sweep."""
    from train.compare import collect
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    client.search_experiments()  # creates the store
    with pytest.raises(UserError, match=re.escape(f"no MLflow experiment 'jpeg-sweep' in {uri} (it holds none yet)")):
        collect("jpeg-sweep")
    for name in ("jpeg-restore", "gpu-minutes"):
        client.create_experiment(name)
    with pytest.raises(UserError, match=re.escape("(it holds 'gpu-minutes', 'jpeg-restore': --experiment NAME)")):
        collect("jpeg-sweep")


def test_compare_shows_latency_columns_only_where_a_run_has_them():
    from train.compare import markdown

    row = {"run": "dncnn", "arch": "dncnn", "status": "FINISHED", "params_m": 0.556, "macs_per_pixel_k": 554.0,
           "train_time_min": 0.75, "images_per_s": 3000.0, "best_val_psnr": 32.1, "best_val_ssim": 0.9,
           "cpu_ms_512": None, "gpu_ms_512": None, "psnr_q10": 29.0, "ssim_q10": 0.81, "psnrb_q10": 28.5,
           **{f"{m}_q{q}": None for q in (20, 30, 40) for m in ("psnr", "ssim", "psnrb")}}
    assert "GPU ms" not in markdown([row], {}, "live1_gray")
    assert "| - | FINISHED |" in markdown([{**row, "arch": None}], {}, "live1_gray")  # a run of another tool: no model.arch
    timed = {**row, "run": "unet | bs64\nlr 2e-4", "gpu_ms_512": 2.4}  # a run name MLflow takes as it is
    lines = markdown([row, timed], {"psnr_q10": 27.77, "ssim_q10": 0.773, "psnrb_q10": 25.33}, "live1_gray").splitlines()
    assert "GPU ms 512²" in lines[0] and "CPU ms" not in lines[0]
    assert len({line.replace(r"\|", "").count("|") for line in lines}) == 1  # every row as wide as the header
    assert "| 2.4 |" in lines[-1] and "| - |" in lines[-2] and lines[-1].startswith(r"| unet \| bs64 lr 2e-4 | dncnn |")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(tmp_path, port: int) -> subprocess.Popen:
    """A real `mlflow server` (SQLite and artifacts in tmp_path), once it answers; without MLflow 3's
    job runner (GenAI jobs, unused here: 8 more processes and 20 more CPU-seconds in its first 30 s)."""
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server_artifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    end = time.time() + 90
    while time.time() < end:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not answer in 90 s")


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_a_tracking_server_that_goes_away_mid_run_costs_the_training_nothing(tiles_dir, tmp_path, failure):
    """The server killed (connections refused) or hung (SIGSTOP: connections taken, never answered) at
    step 20: the run used to wait out MLflow's retries (4 and 20 minutes a call) and die with a
    traceback. It trains on, recording the rest; the import puts that into its run."""
    port, out = _free_port(), tmp_path / "out"
    env = {**env_for(tmp_path), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    server = _mlflow_server(tmp_path, port)
    try:
        proc = subprocess.Popen([sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "train.max_steps=60", "--set", "train.log_every=5",
                                 "--set", "train.val_every=20", "--set", "train.ckpt_every=20", "--set", "tracking.timeout_s=3",
                                 "--out", str(out)], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "step 20/60" in line:
                os.killpg(server.pid, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
        log = "".join(lines)
        assert f"MLflow store http://127.0.0.1:{port} failed" in log and "done: 60 steps" in log, log[-3000:]
        assert failure == "killed" or "no answer in 3 s (tracking.timeout_s)" in log, log[-3000:]
        if failure == "hung":
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        run_id = torch.load(out / "image_compression_model.pth", weights_only=True)["mlflow_run_id"]
        record = [json.loads(line) for line in (out / "mlflow_record.jsonl").read_text().splitlines()]
        assert record[0]["start"]["continues"] == run_id and record[-1]["status"] == "FINISHED"
        if failure == "killed":  # the import of the record is the same after either
            return

        server = _mlflow_server(tmp_path, port)  # back, on the same database
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        assert client.get_run(run_id).info.status == "RUNNING"
        imported = subprocess.run([sys.executable, "-m", "train.import_run", str(out)], env=env, cwd=REPO, capture_output=True, text=True)
        assert imported.returncode == 0 and run_id in imported.stdout, imported.stderr[-2000:]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["best_val_psnr"] > 0
        steps = {m.step for m in client.get_metric_history(run_id, "train_loss")}
        assert steps == set(range(5, 61, 5))  # before the server went and after
        assert "image_compression_model.pth" in {a.path for a in client.list_artifacts(run_id)}
        again = subprocess.run([sys.executable, "-m", "train.import_run", str(out)], env=env, cwd=REPO, capture_output=True, text=True)
        assert again.returncode == 2 and "is already in the store: run" in again.stderr, again.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already when an assertion came first
            os.killpg(server.pid, signal.SIGKILL)


def test_importing_a_folder_of_records_passes_over_those_in_the_store_and_reports_bad_ones(tmp_path, monkeypatch, capsys):
    """`import_run docs/results/gpu/runs/*/` again after a new run's record was added: the first record
    already in the store stopped the import before the new one (and a folder without a record too)."""
    from train.import_run import main as import_run
    from train.loop.tracking import make_tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("a", "b"):
        tracker = make_tracker(True, tmp_path / name, offline=True, experiment="gpu-runs", run_name=name)
        tracker.log_params({"model.arch": "unet"})
        tracker.log_metrics({"val_psnr": 32.0}, 100)
        tracker.close("FINISHED")
    (tmp_path / "c").mkdir()  # no record
    assert import_run([str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert import_run([str(tmp_path / name) for name in ("a", "c", "b")]) == 1  # c could not be imported
    out, err = capsys.readouterr()
    assert err.splitlines()[0].startswith(f"skipped {tmp_path / 'a'}: {tmp_path / 'a' / 'mlflow_record.jsonl'} is already in the store as run ")
    assert err.splitlines()[1] == f"skipped {tmp_path / 'c'}: no run record {tmp_path / 'c' / 'mlflow_record.jsonl'} (a run recorded without MLflow writes one)"
    assert out.startswith(f"imported {tmp_path / 'b' / 'mlflow_record.jsonl'} as MLflow run ")
    runs = mlflow.search_runs(experiment_names=["gpu-runs"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    assert import_run([str(tmp_path / "a"), str(tmp_path / "b")]) == 0  # both in the store: nothing to do, not a failure
