"""slurm/sweep.sh on a real one-node Slurm cluster (slurm-wlm + munge on localhost, installed
with apt-get when missing): every architecture trains in smoke mode as an array task, logs a
finished MLflow run with the sweep's tags and LIVE1 figures, and train.compare tabulates them;
SIGTERM to a running task checkpoints, requeues and resumes it. Also two simulated nodes
(torchrun c10d rendezvous on 127.0.0.1) train one model together."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from slurm_cluster import LocalSlurm, ensure_installed
from train_runs import private_store

from train.loop.state import latest_state
from train.sweep import load_sweep, tasks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = ensure_installed()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    c = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture
def sweep_env(tmp_path, tiles_dir, tiles_prepared):
    live1 = tmp_path / "eval" / "live1_gray"  # two test images keep the evaluation quick
    live1.mkdir(parents=True)
    for name in sorted(p.name for p in tiles_dir.iterdir())[:2]:
        shutil.copy(tiles_dir / name, live1 / name)
    return {"SWEEP_OUT": str(tmp_path / "sweep"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
            "EVAL_DATASET": str(live1), "EVAL_QUALITIES": "10", "PREPARED": str(tiles_prepared)}


def data_args(env: dict) -> list[str]:
    """Train every task on the already prepared tiles (q10 and q40) instead of the configs' Train400."""
    return ["--set", f"data.prepared_dir={env['PREPARED']}", "--set", "data.qualities=[10, 40]"]


def _runs(env: dict, experiment: str = "jpeg-sweep"):
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.mark.parametrize("script", ["sweep.sh", "train.sbatch"])
def test_a_job_submitted_outside_the_repository_says_so_in_one_line(tmp_path, script):
    """The scripts run train/main.py from the folder sbatch was called in (Slurm runs a copy of the script)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "slurm" / script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr == f"error: submit from the repository root (sbatch slurm/{script}): {tmp_path} has no train/main.py\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sweep_trains_its_tasks_and_compare_tabulates_them(cluster, sweep_env, tmp_path):
    names = [t["name"] for t in tasks(load_sweep())]
    assert f"#SBATCH --array=0-{len(names) - 1}\n" in (REPO / "slurm" / "sweep.sh").read_text()  # one task per architecture
    # two of the eight (one round on two cores): the fixed-tile autoencoder and the attention restorer;
    # every architecture's optimizer steps are tested in test_models, its inference in test_export
    picked = [names.index(a) for a in ("autoencoder", "restormer")]
    n = len(picked)
    job = cluster.run("sbatch", "--parsable", "--cpus-per-task=1", f"--array={','.join(map(str, picked))}",
                      f"--output={tmp_path}/slurm-%A_%a.out", "slurm/sweep.sh", "--smoke", "--set", "data.backend=torch", *data_args(sweep_env),
                      "--set", "train.max_steps=4", "--set", "train.val_every=4", "--set", "train.ckpt_every=4",
                      # two images at one quality: the full-size models' validation dominated the test's time
                      "--set", "data.limit=2", "--set", "data.qualities=[10]", "--set", "data.batch_size=2",
                      cwd=REPO, env=sweep_env)
    states = cluster.wait_done(job, timeout=900)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("slurm-*.out")))
    assert len(states) == n and set(states.values()) == {"COMPLETED"}, f"{states}\n{logs}"
    runs = _runs(sweep_env)
    assert sorted(int(r.data.tags["array_index"]) for r in runs) == picked
    assert {r.data.tags["arch"] for r in runs} == {"autoencoder", "restormer"}
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["sweep_id"] == job
        assert "live1_gray_model_psnr_q10" in r.data.metrics and "val_psnr" in r.data.metrics
        task_out = Path(sweep_env["SWEEP_OUT"]) / job / f"task_{r.data.tags['array_index']}"
        assert (task_out / "image_compression_model.pth").is_file() and (task_out / "eval.json").is_file()

    out = tmp_path / "compare"
    proc = subprocess.run([sys.executable, "-m", "train.compare", "--experiment", "jpeg-sweep", "--out", str(out)],
                          env={**os.environ, **sweep_env}, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (out / "compare.md").read_text()
    assert table.count("| FINISHED |") == n and "| JPEG |" in table and "live1_gray q10 PSNR" in table
    assert (out / "compare.csv").read_text().count("\n") == n + 1
    assert (out / "psnr_vs_time.png").stat().st_size > 0 and (out / "psnr_vs_params.png").stat().st_size > 0


@pytest.mark.slow
def test_sigterm_checkpoints_requeues_and_resumes(cluster, sweep_env, tmp_path):
    unet = [t["name"] for t in tasks(load_sweep())].index("unet")
    env = {**sweep_env, "SWEEP_EVAL": "0"}
    job = cluster.run("sbatch", "--parsable", f"--array={unet}", "--cpus-per-task=2", f"--output={tmp_path}/slurm-%A_%a.out",
                      "slurm/sweep.sh", "--smoke", "--set", "data.backend=torch", *data_args(env),
                      "--set", "train.max_steps=60",
                      "--set", "train.ckpt_every=1000", "--set", "train.val_every=1000", cwd=REPO, env=env)
    task = f"{job}_{unet}"
    log = tmp_path / f"slurm-{job}_{unet}.out"
    end = time.time() + 300
    while time.time() < end and not (log.is_file() and "step 10/60" in log.read_text()):
        time.sleep(0.5)
    assert log.is_file() and "step 10/60" in log.read_text(), log.read_text() if log.is_file() else "no log"
    cluster.run("scancel", "--signal=TERM", "--batch", task)
    states = cluster.wait_done(job, timeout=600)
    text = log.read_text()
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{text[-3000:]}"
    assert "got SIGTERM, saving a checkpoint and requeueing" in text and "(restart 1)" in text, text[-3000:]
    assert "Traceback" not in text and "torchrun: stopped by SIGTERM, passed on to the workers" in text, text[-6000:]
    assert f"note: the sweep has 8 tasks (0..7) and this job array ends at {unet}; sbatch --array=0-7" in text
    stopped = int(text.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 10 <= stopped < 60 and f"at step {stopped} (epoch" in text  # resumed where it stopped
    out = Path(sweep_env["SWEEP_OUT"]) / job / f"task_{unet}"
    assert torch.load(latest_state(out / "checkpoints"), weights_only=True)["step"] == 60
    (run,) = _runs(env)
    assert run.info.status == "FINISHED" and run.data.tags["stopped_by"] == "SIGTERM"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_multi_node_script_trains_on_the_nodes_it_is_given(cluster, tiles_dir, tmp_path):
    """slurm/train.sbatch on the one node there is: two processes rendezvous (c10d) at the first node of
    the allocation and train one model, recorded in the MLflow store the job was submitted with."""
    env = {"MLFLOW_TRACKING_URI": private_store(tmp_path), "CPU_PROCS": "2", "RDZV_PORT": str(_free_port())}
    job = cluster.run("sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/slurm-%j.out",
                      "slurm/train.sbatch", "--config", str(REPO / "configs" / "arcnn.toml"), "--smoke", "--set", "data.backend=torch",
                      "--set", f"data.dataset={tiles_dir}", "--out", str(tmp_path / "out"), cwd=REPO, env=env)
    states = cluster.wait_done(job, timeout=600)
    text = (tmp_path / f"slurm-{job}.out").read_text()
    assert states == {job: "COMPLETED"}, f"{states}\n{text[-3000:]}"
    assert f"job {job}: 1 nodes x 2 processes x 1 threads" in text and "weights in sync on 2 ranks" in text, text[-3000:]
    assert "Setting OMP_NUM_THREADS" not in text, text[-3000:]  # torchrun's 1 thread a process, whatever the job has
    (run,) = _runs(env, "jpeg-restore")
    assert run.info.status == "FINISHED" and (tmp_path / "out" / "image_compression_model.pth").is_file()


def test_two_simulated_nodes_train_one_model(tiles_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes",
                               str(REPO / "train" / "main.py"), "--config", str(REPO / "configs" / "arcnn.toml"), "--smoke",
                               "--set", "data.backend=torch", "--set", f"data.dataset={tiles_dir}",
                               "--out", str(tmp_path / "out")],  # a shared file system
                              env=env, cwd=REPO, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errs)
    both = "\n".join(errs)
    assert "weights in sync on 2 ranks" in both and "2 ranks on cpu" in both
