"""Real training runs (subprocesses, as users launch them): single process, 2-process torchrun on
gloo, SIGTERM + resume, fp16 with GradScaler, and the one-line errors for bad inputs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from runtime.checkpoint import load_model
from runtime.device import resolve_precision
from train.loop.state import latest_state

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "train" / "main.py")
SMOKE = ["--config", str(REPO / "configs" / "dncnn.toml"), "--smoke", "--set", "data.backend=torch"]


def smoke_args(tiles: Path) -> list[str]:
    """The smoke run on the photograph tiles instead of the config's Train400."""
    return [*SMOKE, "--set", f"data.dataset={tiles}"]


def env_for(tmp: Path) -> dict:
    """An empty data root (nothing is read from it) and a private MLflow store."""
    (tmp / "empty_root").mkdir(exist_ok=True)
    return {**os.environ, "JPEG_RESTORE_DATA_ROOT": str(tmp / "empty_root"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}


def run(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def mlflow_run(env: dict, run_id: str):
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient().get_run(run_id)


@pytest.fixture(scope="module")
def smoke_run(tiles_dir, tmp_path_factory):
    """One single-process smoke training, shared by the tests that inspect its outputs."""
    tmp = tmp_path_factory.mktemp("smoke")
    env = env_for(tmp)
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--out", str(tmp / "out")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out", env, proc


def test_smoke_run_writes_a_self_describing_best_checkpoint(smoke_run):
    out, _, _ = smoke_run
    blob = torch.load(out / "image_compression_model.pth", weights_only=True)
    assert blob["arch"] == "dncnn" and blob["kwargs"] == {"depth": 17, "width": 64, "batch_norm": True}
    assert blob["mode"] == "gray" and blob["config"]["model"]["arch"] == "dncnn"
    assert {"val_psnr", "val_ssim", "val_psnrb", "val_psnr_q10"} <= set(blob["metrics"])
    model, meta = load_model(out / "image_compression_model.pth")
    assert meta["step"] in (3, 6)
    x = torch.rand(1, 1, 33, 47)
    assert model(x).shape == x.shape
    assert (out / "config.toml").is_file() and (out / "curves.png").is_file()
    final = latest_state(out / "checkpoints")
    assert final.name == "step_00000006.pt"
    # saved inside the loop at the last step: its wall time must include this session
    assert torch.load(final, weights_only=True)["wall_time"] > 0


def test_smoke_run_is_a_finished_mlflow_run_with_metrics_and_artifacts(smoke_run):
    out, env, _ = smoke_run
    run_id = torch.load(out / "image_compression_model.pth", weights_only=True)["mlflow_run_id"]
    r = mlflow_run(env, run_id)
    assert r.info.status == "FINISHED"
    want = {"train_loss", "val_loss", "val_psnr", "val_ssim", "val_psnrb", "lr", "images_per_s", "step_time_s",
            "data_wait_s", "epoch_time_s", "total_wall_time_s", "train_tflops"}
    assert want <= set(r.data.metrics), want - set(r.data.metrics)
    assert r.data.params["model.arch"] == "dncnn" and r.data.params["train.max_steps"] == "6"
    assert r.data.tags["world_size"] == "1" and r.data.tags["precision"] == resolve_precision("auto", torch.device("cpu")) and "torch" in r.data.tags
    history = mlflow.MlflowClient().get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"config.toml", "image_compression_model.pth", "curves.png", "val_images"} <= artifacts
    figures = mlflow.MlflowClient().list_artifacts(run_id, "val_images")
    assert len(figures) == 2 and all(a.path.endswith(".png") for a in figures)


def test_evaluate_cli_runs_a_checkpoint_on_test_images(smoke_run, tmp_path, tiles_dir):
    out, env, _ = smoke_run
    subset = tmp_path / "test_subset"
    subset.mkdir()
    for name in sorted(p.name for p in tiles_dir.iterdir())[-3:]:
        shutil.copy(tiles_dir / name, subset / name)
    proc = run([sys.executable, "-m", "train.evaluate", "--checkpoint", str(out / "image_compression_model.pth"),
                "--dataset", str(subset), "--qualities", "10", "--json", str(tmp_path / "r.json"), "--log-mlflow"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["arch"] == "dncnn" and res["images"] == 3
    jpeg, model = res["results"]["10"]["jpeg"], res["results"]["10"]["model"]
    assert 20 < jpeg["psnr"] < 40 and 15 < model["psnr"] < 45  # 6 smoke steps: about the JPEG itself
    run_id = torch.load(out / "image_compression_model.pth", weights_only=True)["mlflow_run_id"]
    assert "test_subset_model_psnr_q10" in mlflow_run(env, run_id).data.metrics


@pytest.mark.slow
def test_two_process_torchrun_trains_in_sync(tiles_dir, tmp_path):
    env = env_for(tmp_path)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                MAIN, *smoke_args(tiles_dir), "--out", str(tmp_path / "out")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights in sync on 2 ranks" in proc.stderr
    blob = torch.load(tmp_path / "out" / "image_compression_model.pth", weights_only=True)
    r = mlflow_run(env, blob["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.data.tags["world_size"] == "2" and r.data.tags["weights_in_sync"] == "true"
    assert {"val_psnr", "images_per_s", "train_loss"} <= set(r.data.metrics)


def _final_weights(out: Path, part: str = "model") -> dict:
    return torch.load(latest_state(out / "checkpoints"), weights_only=True)[part]


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(tiles_dir, tmp_path):
    env = env_for(tmp_path)
    args = [sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "train.max_steps=12", "--set", "train.ckpt_every=100",
            "--set", "train.val_every=4",  # validation does not touch the weights
            "--set", "train.ema_decay=0.9"]  # nor the weight average, which resumes too
    ref = run(args + ["--out", str(tmp_path / "ref")], env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(args + ["--out", str(tmp_path / "cut")], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "step 4/12" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    stopped = int(latest_state(tmp_path / "cut" / "checkpoints").stem.split("_")[1])
    assert 4 <= stopped < 12, "".join(lines)[-2000:]
    assert any("stopped by SIGTERM" in line for line in lines)
    # the stopped run (a time-boxed GPU chunk) already holds its best model and curves
    run_id = torch.load(tmp_path / "cut" / "image_compression_model.pth", weights_only=True)["mlflow_run_id"]
    r = mlflow_run(env, run_id)
    assert r.info.status == "KILLED" and r.data.tags["stopped_at_step"] == str(stopped)
    assert {"image_compression_model.pth", "curves.png"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}

    resumed = run(args + ["--out", str(tmp_path / "cut"), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and f"at step {stopped}" in resumed.stderr
    assert f"step {stopped + 1}/12" in resumed.stderr and f"step {stopped}/12" not in resumed.stderr
    for part in ("model", "ema"):
        ref_w, cut_w = _final_weights(tmp_path / "ref", part), _final_weights(tmp_path / "cut", part)
        assert ref_w.keys() == cut_w.keys()
        for k in ref_w:
            assert torch.equal(ref_w[k], cut_w[k]), (part, k)
    # one MLflow run, stopped then finished
    assert torch.load(tmp_path / "cut" / "image_compression_model.pth", weights_only=True)["mlflow_run_id"] == run_id
    r = mlflow_run(env, run_id)
    assert r.info.status == "FINISHED" and r.data.tags["stopped_by"] == "SIGTERM"


def test_fp16_with_grad_scaler_runs_and_saves_scaler_state(tiles_dir, tmp_path):
    env = env_for(tmp_path)
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "train.precision=fp16", "--set", "tracking.enabled=false",
                "--set", "model.kwargs.depth=4", "--set", "model.kwargs.width=16",  # fp16 is emulated (slow) on CPU
                "--out", str(tmp_path / "out")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(latest_state(tmp_path / "out" / "checkpoints"), weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["step"] == 6


def test_a_time_budget_fits_the_step_count_so_the_schedule_ends_with_the_time(tiles_dir, tmp_path):
    env, out = env_for(tmp_path), tmp_path / "out"
    budget = ["--set", "train.time_budget_s=4", "--set", "train.max_steps=100000", "--set", "train.log_every=2",
              "--set", "train.val_every=100000", "--set", "train.ckpt_every=100000", "--set", "tracking.enabled=false",
              "--set", "schedule.warmup_steps=4"]
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), *budget, "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(latest_state(out / "checkpoints"), weights_only=True)
    assert 10 < state["step"] == state["max_steps"] < 100000, (state["step"], state["max_steps"])
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6)  # the cosine ran to its end
    assert 2 < state["step_time"] < 4 + 10 and state["wall_time"] > state["step_time"]  # + a loaded CI machine's slack
    again = run([sys.executable, MAIN, *smoke_args(tiles_dir), *budget, "--resume", "--out", str(out)], env)
    assert again.returncode == 0 and f"at step {state['step']}" in again.stderr, again.stderr[-2000:]
    assert torch.load(latest_state(out / "checkpoints"), weights_only=True)["step"] == state["step"]  # nothing left to do


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.bogus=1"], "unknown config key train.bogus"),
    (["--set", "optim.lr=fast"], "optim.lr must be of type float"),
    (["--set", "data.dataset=no_such_dataset"], "no_such_dataset"),
])
def test_bad_inputs_fail_with_one_line(tiles_dir, tmp_path, extra, message):
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), *extra, "--out", str(tmp_path / "out")], env_for(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr[-2000:]


def test_missing_data_root_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JPEG_RESTORE_DATA_ROOT"}
    proc = run([sys.executable, MAIN, *SMOKE, "--out", str(tmp_path / "out")], env)
    assert proc.returncode == 2 and "error: no data root" in proc.stderr


def test_resume_rejects_other_architectures_and_passes_over_a_corrupt_state(smoke_run, tmp_path, tiles_dir):
    out, env, _ = smoke_run
    work = tmp_path / "out"
    shutil.copytree(out / "checkpoints", work / "checkpoints")
    other = run([sys.executable, MAIN, "--config", str(REPO / "configs" / "unet.toml"), "--smoke", "--resume",
                 "--set", f"data.dataset={tiles_dir}", "--out", str(work)], env)
    assert other.returncode == 2 and "saved by a dncnn" in other.stderr and "asks for unet" in other.stderr, other.stderr[-2000:]
    newest = latest_state(work / "checkpoints")
    assert newest.name == "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    older = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--resume", "--out", str(work)], env)
    assert older.returncode == 0, older.stderr[-2000:]
    assert "step_00000006.pt is corrupt" in older.stderr and "resuming from the older state step_00000003.pt" in older.stderr
    assert "at step 3" in older.stderr and "step 4/6" in older.stderr
    for state in (work / "checkpoints").glob("step_*.pt"):
        state.write_bytes(b"garbage")
    corrupt = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--resume", "--out", str(work)], env)
    assert corrupt.returncode == 2 and "no usable training state" in corrupt.stderr, corrupt.stderr[-2000:]
    assert corrupt.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_quickstart_runs_end_to_end_on_embedded_images(tmp_path):
    """The README's main job, shortened to 1 step (each validation of the held-out photographs,
    retina's 1411² among them, takes 25 s here): no data root needed."""
    env = {k: v for k, v in os.environ.items() if k != "JPEG_RESTORE_DATA_ROOT"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run([sys.executable, "-m", "train.quickstart", "--out", str(tmp_path / "qs"), "--steps", "1", "--eval-size", "192"], env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert res["images"] == ["astronaut", "camera", "retina"]
    assert set(res["results"]) == {"10", "20", "30", "40"} and "model" in res["results"]["10"]
    assert len(list((tmp_path / "qs" / "side_by_side").glob("*.png"))) == 2
    assert load_model(tmp_path / "qs" / "run" / "image_compression_model.pth")[1]["arch"] == "unet"


@pytest.mark.slow
def test_a_run_recorded_without_mlflow_is_imported_and_continued(tiles_dir, tmp_path, monkeypatch, capsys):
    """The GPU machine has no MLflow: the run is recorded to a file, imported here, and a later
    call continues from its weights (train.init_from)."""
    from train.evaluate import main as evaluate
    from train.import_run import main as import_run

    tiles, env = tiles_dir, env_for(tmp_path)
    for key in ("JPEG_RESTORE_DATA_ROOT", "MLFLOW_TRACKING_URI"):  # the in-process commands below read them too
        monkeypatch.setenv(key, env[key])
    out = tmp_path / "gpu-run"
    proc = run([sys.executable, MAIN, *smoke_args(tiles), "--set", "tracking.offline=true", "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "mlflow_record.jsonl").is_file()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # nothing in the store yet
    few = tmp_path / "few"  # three test images are enough to see the figures travel
    few.mkdir()
    for tile in sorted(tiles.glob("*.png"))[:3]:
        shutil.copy(tile, few)
    eval_args = ["--checkpoint", str(out / "image_compression_model.pth"), "--dataset", str(few), "--qualities", "10", "--log-mlflow"]
    assert evaluate(eval_args) == 0  # evaluated on the GPU machine, before the import: added to the record
    assert f"to {out / 'mlflow_record.jsonl'}" in capsys.readouterr().out
    assert import_run([str(out), "--tag", "gpu=none (test)"]) == 0
    (r,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert r.info.status == "FINISHED" and r.data.tags["gpu"] == "none (test)" and r.info.run_name == "dncnn-gpu-run"
    assert r.data.params["train.max_steps"] == "6" and "val_psnr" in r.data.metrics
    assert min(r.data.metrics[f"few_{kind}_psnr_q10"] for kind in ("model", "jpeg")) > 20  # the record's evaluation
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(r.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert {"config.toml", "image_compression_model.pth", "curves.png"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}
    capsys.readouterr()
    assert import_run([str(out)]) == 2 and "already in the store" in capsys.readouterr().err
    assert evaluate(eval_args) == 0 and f"to MLflow run {r.info.run_id}" in capsys.readouterr().out
    best = out / "image_compression_model.pth"
    cont = run([sys.executable, MAIN, *smoke_args(tiles), "--set", f"train.init_from={best}", "--set", "tracking.enabled=false",
                "--out", str(tmp_path / "next-call")], env)
    assert cont.returncode == 0 and f"initialised the weights from {best}" in cont.stderr, cont.stderr[-2000:]
    wrong = run([sys.executable, MAIN, "--config", str(REPO / "configs" / "unet.toml"), "--smoke", "--set", f"data.dataset={tiles}",
                 "--set", f"train.init_from={best}", "--out", str(tmp_path / "wrong")], env)
    assert wrong.returncode == 2 and "holds a dncnn gray model" in wrong.stderr


@pytest.mark.slow
def test_a_quality_conditioned_model_trains_exports_and_reads_the_quality_from_the_file(tiles_dir, tmp_path, photo_pair):
    """data.quality_plane: the loaders append the JPEG quality as an input plane; evaluation, ONNX
    parity and restore give the model the quality (restore reads it from the file's own tables)."""
    from data_pipeline.images import jpeg_bytes
    from export.onnx_export import check_parity, export_onnx
    from runtime.inference import Restorer, image_to_tensor, with_quality

    env = env_for(tmp_path)
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "model.kwargs={depth=5, width=8, cond_channels=1}",
                "--set", "data.quality_plane=true", "--set", "tracking.enabled=false", "--out", str(tmp_path / "out")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = tmp_path / "out" / "image_compression_model.pth"
    model, meta = load_model(best)
    assert meta["kwargs"]["cond_channels"] == 1 and "val_psnr_q10" in meta["metrics"]
    restorer = Restorer(best)
    gray = photo_pair[0][:96, :128]
    jpeg = read_image_bytes(jpeg_bytes(gray, 10))
    assert restorer.conditioned and restorer(jpeg, 10).shape == gray.shape
    x = image_to_tensor(jpeg, "cpu")
    with torch.no_grad():  # the quality plane reaches the output (6 steps: below a uint8 level, so in float)
        assert not torch.equal(model(with_quality(x, 10)), model(with_quality(x, None)))
    export_onnx(best, tmp_path / "m.onnx")
    assert check_parity(best, tmp_path / "m.onnx")["ok"]
    (tmp_path / "in.jpg").write_bytes(jpeg_bytes(gray, 30))
    restored = run([sys.executable, "-m", "serve_bench.restore", str(tmp_path / "in.jpg"), "-o", str(tmp_path / "r"),
                    "--checkpoint", str(best)], env)
    assert restored.returncode == 0 and "JPEG q30" in restored.stdout, restored.stderr[-2000:]


def read_image_bytes(data: bytes):
    from data_pipeline.images import decode_jpeg

    return decode_jpeg(data)
