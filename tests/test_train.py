"""Real training runs (subprocesses, as users launch them): single process, 2-process torchrun on
gloo, fp16 with GradScaler, time budgets, quality conditioning and the one-line errors for bad
inputs (stopping and continuing: test_resume.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from train_runs import MAIN, REPO, SMOKE, env_for, final_weights, limited_memory, mlflow_run, run, run_on_terminal, smoke_args

from runtime.checkpoint import load_model
from runtime.device import resolve_precision
from runtime.models import tiny_kwargs
from train.evaluate import main as evaluate_main
from train.loop.state import latest_state, state_path


@pytest.fixture(scope="module")
def smoke_run(tiles_dir, tmp_path_factory):
    """One single-process smoke training, shared by the tests that inspect its outputs."""
    tmp = tmp_path_factory.mktemp("smoke")
    env = {**env_for(tmp), "MPLCONFIGDIR": str(tmp / "matplotlib")}  # a new store and font cache: a fresh machine
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--out", str(tmp / "out")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out", env, proc


def test_smoke_run_writes_a_self_describing_best_checkpoint(smoke_run):
    out, _, _ = smoke_run
    blob = torch.load(out / "image_compression_model.pth", weights_only=True)
    assert blob["arch"] == "dncnn" and blob["kwargs"] == {**tiny_kwargs("dncnn"), "batch_norm": True}  # the smoke size, the config's batch_norm
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


def test_a_run_on_a_fresh_machine_logs_its_own_lines_only(smoke_run):
    """MLflow creating its store and matplotlib building its font cache are not the run's news."""
    lines = smoke_run[2].stderr.splitlines()
    assert lines and all(re.match(r"\d\d:\d\d:\d\d \[rank 0\] ", line) for line in lines), lines
    assert " 1 rank on cpu" in lines[2] and "in sync" not in lines[-1], lines


def test_smoke_run_is_a_finished_mlflow_run_with_metrics_and_artifacts(smoke_run):
    out, env, _ = smoke_run
    run_id = torch.load(out / "image_compression_model.pth", weights_only=True)["mlflow_run_id"]
    r = mlflow_run(env, run_id)
    assert r.info.status == "FINISHED"
    want = {"train_loss", "val_loss", "val_psnr", "val_ssim", "val_psnrb", "lr", "images_per_s", "step_time_s",
            "data_wait_s", "epoch_time_s", "total_wall_time_s", "train_tflops", "val_time_s"}
    assert want <= set(r.data.metrics), want - set(r.data.metrics)
    assert r.data.metrics["val_time_s"] > 0
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
                "--dataset", str(subset), "--qualities", "10", "--json", str(tmp_path / "r.json"), "--log-mlflow", "--precision", "auto"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["arch"] == "dncnn" and res["images"] == 3
    assert res["precision"] == resolve_precision("auto", torch.device("cpu"))  # what ran, not 'auto'
    jpeg, model = res["results"]["10"]["jpeg"], res["results"]["10"]["model"]
    assert 20 < jpeg["psnr"] < 40 and 15 < model["psnr"] < 45  # 6 smoke steps: about the JPEG itself
    run_id = torch.load(out / "image_compression_model.pth", weights_only=True)["mlflow_run_id"]
    assert "test_subset_model_psnr_q10" in mlflow_run(env, run_id).data.metrics
    assert "img/s" not in proc.stderr  # no progress bar in a log

    # on a terminal, a bar over the images of each quality while the evaluation runs
    code, shown, _ = run_on_terminal([sys.executable, "-m", "train.evaluate", "--jpeg-only", "--dataset", str(subset), "--qualities", "10,20"], env)
    assert code == 0 and re.search(r"q10: +0%\|.*\| 0/6 \[", shown), shown[-2000:]  # the 3 images at 2 qualities
    frames = [f for f in re.split(r"[\r\n]+", shown) if "/6 [" in f]
    assert frames and all(re.match(r"(\x1b\[[0-9;]*[A-Za-z])*q(10|20): ", f) for f in frames), frames  # its first one had no label


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
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--out", str(tmp_path / "out"), "--resume", "--set", "train.max_steps=8"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a resume on one process says that the global batch halved
    assert "resumed with changed settings: train.max_steps: 6 -> 8, ranks: 2 -> 1 (8 -> 4 patches a step)" in proc.stderr, proc.stderr[-3000:]
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--out", str(tmp_path / "copy"), "--resume", "--set", "train.max_steps=8",
                "--set", "train.grad_accum_steps=2"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]  # or that accumulating two micro-batches keeps it
    assert "train.max_steps: 6 -> 8, train.grad_accum_steps: 1 -> 2, ranks: 2 -> 1 (8 -> 8 patches a step)" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_accumulating_micro_batches_step_as_one_process_taking_them_at_once(tiles_dir, tmp_path):
    """The resident loader gives a step of 2 ranks x batch 2 x 2 micro-batches the 8 patches one
    process's batch 8 takes: DDP, which synchronises the last micro-batch's gradients only, must
    end with that process's weights (a network without BatchNorm, which normalises per batch)."""
    env = env_for(tmp_path)
    args = [*smoke_args(tiles_dir), "--set", "model.kwargs={depth = 3, width = 8, batch_norm = false}", "--set", "data.backend=resident",
            "--set", "train.precision=fp32", "--set", "optim.name=sgd", "--set", "optim.lr=0.5", "--set", "schedule.name=constant",
            "--set", "schedule.warmup_steps=0", "--set", "train.max_steps=3", "--set", "tracking.enabled=false"]
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", MAIN, *args,
               "--set", "data.batch_size=2", "--set", "train.grad_accum_steps=2", "--out", str(tmp_path / "ddp")], env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run([sys.executable, MAIN, *args, "--set", "data.batch_size=8", "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp_w, one_w = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "one")
    assert all(torch.allclose(v, ddp_w[k], atol=1e-5) for k, v in one_w.items())
    assert "in sync on 2 ranks" in ddp.stderr and all("8 patches a step, 2 steps/epoch" in p.stderr for p in (ddp, one))
    # both stopped a batch into epoch 1; one more step, each on one process with batch 8, takes the same patches
    for out in ("ddp", "one"):
        more = run([sys.executable, MAIN, *args, "--set", "data.batch_size=8", "--set", "train.max_steps=4", "--out", str(tmp_path / out), "--resume"], env)
        assert more.returncode == 0 and "at step 3 (epoch 1, batch 1)" in more.stderr, more.stderr[-3000:]
    ddp_w, one_w = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "one")
    assert all(torch.allclose(v, ddp_w[k], atol=1e-4) for k, v in one_w.items())  # the last step's rounding, amplified


def test_on_a_terminal_the_log_lines_stand_above_the_progress_bar(tiles_dir, tmp_path):
    """Rank 0 on a terminal draws a tqdm bar: the lines of its checkpoints went onto the bar's own line,
    and its validations came without their time and rank."""
    code, shown, _ = run_on_terminal([sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "tracking.enabled=false", "--set", "train.max_steps=12",
                                      "--set", "train.val_every=6", "--set", "train.ckpt_every=4", "--out", str(tmp_path / "out")], env_for(tmp_path))
    assert code == 0, shown[-3000:]
    pieces = re.split(r"[\r\n]+", shown)
    bars = [p for p in pieces if "/12 [" in p]
    lines = [p for p in pieces if "[rank 0]" in p]
    assert bars and not [p for p in bars if "[rank 0]" in p], [p for p in bars if "[rank 0]" in p]
    assert all(re.match(r"\d\d:\d\d:\d\d \[rank 0\] ", p) for p in lines), lines
    assert sum("validation at step" in p for p in lines) == 2 and sum("saved training state" in p for p in lines) == 3, lines
    # the bar's last frame shows the last validation (it showed the one before, until a next window that never came)
    last = float(re.search(r"validation at step 12: PSNR (\S+)", shown).group(1))
    assert re.search(rf"12/12 \[.*loss=\S+, psnr={last:.2f}, img_s=\d+\]", bars[-1]), bars[-1]


def _rank_pid(out: Path, rank: int) -> int:
    """The pid of the training process of that rank writing to `out` (from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            if str(out) in (proc / "cmdline").read_text() and f"RANK={rank}\0" in (proc / "environ").read_text():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no rank {rank} process writing to {out}")


def _sigterm_during_torchrun(out: Path, env: dict, args: list[str], at: str, rank: int) -> tuple[int, list[str], int]:
    """Two ranks trained with `args`; SIGTERM to `rank` once rank 0 logs `at`. Returns torchrun's exit
    code, the log and the step the run says it stopped at (0: none)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", MAIN,
                             *args, "--out", str(out)], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if at in line:
            os.kill(_rank_pid(out, rank), signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    code = proc.wait(timeout=120)
    stopped = [line for line in lines if "stopped by" in line]
    assert len(stopped) == 1 and "[rank 0] stopped by SIGTERM at step " in stopped[0], "".join(lines)[-3000:]
    return code, lines, int(stopped[0].split(" at step ")[1].split(";")[0])


@pytest.mark.slow
def test_a_rank_that_loses_the_others_stops_in_one_line(tiles_dir, tmp_path):
    """Rank 0 killed outright (the OOM killer, kill -9): rank 1 died in its next collective with a
    traceback of gloo's "Connection closed by peer"; now one log line, and torchrun names rank 0."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", MAIN,
                             *smoke_args(tiles_dir), "--set", "train.max_steps=100000", "--out", str(out)],
                            env=env_for(tmp_path), cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "/100000 loss" in line:
            os.kill(_rank_pid(out, 0), signal.SIGKILL)
            break
    lines += proc.stderr.readlines()
    log = "".join(lines)
    assert proc.wait(timeout=120) != 0
    # gloo says it plain or as a read's error: "(Read error [127.0.0.1]:1428: Connection reset by peer)"
    lost = r"\[rank 1\] lost the other ranks at step \d+ \((Read error [^()]*: )?Connection (closed|reset) by peer"
    assert "[rank1]: Traceback" not in log and re.search(lost, log), log[-3000:]
    assert "exitcode  : -9" in log  # torchrun's summary: rank 0 was killed


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_and_names_the_signal(tiles_dir, tmp_path):
    """SIGTERM to rank 1 alone (the others learn of it at the next stop check): the run saves and
    stops as after a signal to all (rank 0 used to log "stopped by None" and end the MLflow run FAILED)."""
    env, out = env_for(tmp_path), tmp_path / "out"
    code, lines, step = _sigterm_during_torchrun(out, env, [*smoke_args(tiles_dir), "--set", "train.max_steps=100000",
                                                            "--set", "train.log_every=10", "--set", "train.val_every=100000",
                                                            "--set", "train.ckpt_every=100000"], at="step 10/", rank=1)
    # a stopped run is not a finished one: each rank exits 128 + 15, which torchrun reports as a failure
    assert code == 1 and "exitcode  : 143" in "".join(lines), "".join(lines)[-3000:]
    assert not any("[rank 1]" in line for line in lines), "".join(lines)[-3000:]  # the log is rank 0's
    assert latest_state(out / "checkpoints") == state_path(out / "checkpoints", step)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (r,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert r.info.status == "KILLED" and r.data.tags["stopped_by"] == "SIGTERM"


@pytest.mark.slow
def test_slow_steps_under_ddp_are_checked_for_a_stop_every_step(tiles_dir, tmp_path):
    """torchrun passes a signal on and SIGKILLs its workers 30 s later. The ranks checked for a stop
    every 10 steps: a 32 M DRUNet on 2 CPU cores (20 s a step) was killed before it saved, its
    MLflow run left RUNNING. The checks now come as often as STOP_CHECK_S allows, every step here
    (2 to 3 s a step): the run stops at the next step or the one after."""
    out = tmp_path / "out"
    code, lines, step = _sigterm_during_torchrun(
        out, env_for(tmp_path), [*smoke_args(tiles_dir), "--set", "model.arch=unet", "--set", "model.kwargs={width = 64, levels = 2}",
                                 "--set", "data.patch_size=160", "--set", "data.batch_size=8", "--set", "data.limit=8",
                                 "--set", "train.precision=fp32", "--set", "train.max_steps=100", "--set", "train.val_every=1000",
                                 "--set", "train.ckpt_every=1000"], at="step 2/100", rank=0)
    assert step <= 4 and latest_state(out / "checkpoints") == state_path(out / "checkpoints", step), "".join(lines)[-3000:]


def test_the_stop_checks_keep_pace_with_the_steps():
    from train.loop.trainer import STOP_CHECK_EVERY, steps_between_stop_checks

    assert steps_between_stop_checks(seconds=20.0, steps=1) == 1  # a large model on CPUs: every step
    assert steps_between_stop_checks(seconds=3.0, steps=3) == 2
    assert steps_between_stop_checks(seconds=0.5, steps=10) == STOP_CHECK_EVERY  # GPU steps: every 10
    assert steps_between_stop_checks(seconds=0.0, steps=1) == STOP_CHECK_EVERY

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
              "--set", "schedule.warmup_steps=4",
              "--set", "model.kwargs.depth=4", "--set", "model.kwargs.width=16"]  # many steps in 4 s, even beside other tests
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), *budget, "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(latest_state(out / "checkpoints"), weights_only=True)
    assert 10 < state["step"] == state["max_steps"] < 100000, (state["step"], state["max_steps"])
    # the cosine's end moved with every refit to where the run stopped (after 4 warm-up steps), and the
    # rate decayed; the last lr reaches 1e-6 only where no slowdown came after the last refit (a machine
    # busy with other work can run out of time steps before the end that refit foresaw)
    assert state["scheduler"]["_schedulers"][1]["T_max"] + 4 == state["step"]
    assert 1e-6 - 1e-12 <= state["optimizer"]["param_groups"][0]["lr"] < 1e-4
    assert 2 < state["step_time"] < 4 + 10 and state["wall_time"] > state["step_time"]  # + a loaded CI machine's slack
    again = run([sys.executable, MAIN, *smoke_args(tiles_dir), *budget, "--resume", "--out", str(out)], env)
    assert again.returncode == 0 and f"at step {state['step']}" in again.stderr, again.stderr[-2000:]
    assert torch.load(latest_state(out / "checkpoints"), weights_only=True)["step"] == state["step"]  # nothing left to do


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.bogus=1"], "unknown config key train.bogus"),
    (["--set", "optim.lr=fast"], "optim.lr must be of type float"),
    (["--set", "data.dataset=no_such_dataset"], "no_such_dataset"),
    (["--set", "tracking.tracking_uri=bogus://x"], "MLflow store bogus://x cannot be used: "),
])
def test_bad_inputs_fail_with_one_line(tiles_dir, tmp_path, extra, message):
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), *extra, "--out", str(tmp_path / "out")], env_for(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr[-2000:]



def test_a_store_that_cannot_be_used_is_said_in_seconds(tiles_dir, tmp_path, monkeypatch, in_process):
    """A tracking server that does not answer took MLflow's retries, 4 minutes, to fail; a SQLite
    store under a file gave a FileExistsError traceback. Both are one line before the first step,
    and a command that logs to a run after its work (evaluate, the latency benchmarks) says it, as it says
    a server that never answers, after CALL_TIMEOUT_S."""
    import socket

    from runtime import mlflow_store
    from runtime.mlflow_store import log_to_run

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "a_file").write_text("")
    for uri, said in ((f"http://127.0.0.1:{port}", f"no server answers at 127.0.0.1:{port} (Connection refused)"),
                      (f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}", f"output {tmp_path / 'a_file'} exists and is not a folder")):
        env = {**env_for(tmp_path), "MLFLOW_TRACKING_URI": uri}
        proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--out", str(tmp_path / "out")], env, timeout=60)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith(f"error: MLflow store {uri} cannot be used: {said}"), proc.stderr[-2000:]
        assert "step 1/" not in proc.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    proc = in_process(evaluate_main, "--dataset", tiles_dir, "--log-mlflow")
    assert proc.returncode == 2 and proc.stderr.startswith("error: MLflow store http") and not proc.stdout, proc.stderr  # before evaluating
    assert log_to_run("some-run", {"psnr": 30.0}).startswith(f"not logged to MLflow: MLflow store http://127.0.0.1:{port} "
                                                              "cannot be used: no server answers")
    with socket.socket() as hung:  # takes connections (the kernel's backlog) and never answers: MLflow waited 20 minutes
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{hung.getsockname()[1]}")
        monkeypatch.setattr(mlflow_store, "CALL_TIMEOUT_S", 1.0)
        assert log_to_run("some-run", {"psnr": 30.0}) == "not logged to MLflow run some-run: no answer in 1 s"

def test_a_model_larger_than_the_free_memory_is_one_line(tiles_dir, tmp_path):
    """A typo in a width or a level count: the OOM killer ended the run without a word (a U-Net of
    9 levels, 8 G parameters, on this 24 GB machine), or the allocation failed in a traceback."""
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "model.kwargs.depth=17", "--set", "model.kwargs.width=20000",
                "--out", str(tmp_path / "out")], env_for(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: dncnn(depth=17, width=20000, batch_norm=True) has 54,001 M parameters: their "
                                  "weights, gradients and adamw state take ") and "make the model smaller" in proc.stderr


@pytest.mark.slow
def test_a_batch_larger_than_the_memory_is_one_line(tiles_dir, tmp_path):
    """A batch whose activations the device cannot hold: torch's traceback from deep in backward()
    (on a GPU torch.OutOfMemoryError, on a host ENOMEM). Here the host refuses past a 4 GB
    address-space limit (RLIMIT_AS, as `ulimit -v` sets) and a batch of 16 160x160 patches through
    4096 channels needs more; the OOM killer, which ends a process without an error, is not this.
    One layer of them, not a 1024 x 1024 convolution first: the same error in 10 s on 2 cores, not 35."""
    args = [sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "model.kwargs.depth=2", "--set", "model.kwargs.width=4096",
            "--set", "data.batch_size=16", "--set", "data.patch_size=160", "--out", str(tmp_path / "out")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO, **limited_memory(4, env_for(tmp_path)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(
        r"error: out of memory on cpu in training step 1 \((the host refused [\d,]+ MiB more|oneDNN could not create a primitive, "
        r"[\d.]+ of the process's [\d.]+ GiB address-space limit in use)\): a batch of 16 160x160 "
        rf"patches through dncnn \(0.0778 M parameters, {resolve_precision('auto', torch.device('cpu'))}\) needs more than "
        r"the device has: lower data.batch_size \(train.grad_accum_steps keeps the patches a step\) or data.patch_size; "
        r"nothing kept from before",
        proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]


def test_a_run_reports_what_preparing_its_images_skipped(real_images, tmp_path):
    """A file the run could not use was passed over in silence (named only in the prepared folder's
    report.json): a folder of photos could lose most of its images unnoticed."""
    good = sorted(real_images.iterdir())
    (real_images / "cut.png").write_bytes(good[0].read_bytes()[:300])
    (real_images / "notes.txt").write_text("not an image")
    (real_images / "zz_copy.png").write_bytes(good[1].read_bytes())
    proc = run([sys.executable, MAIN, *smoke_args(real_images), "--set", "data.val_fraction=0.5", "--out", str(tmp_path / "out")],
               env_for(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split("] ", 1)[-1] for line in proc.stderr.splitlines()]
    prepared = tmp_path / "out" / "prepared" / f"{real_images.name}-gray"
    start = lines.index(f"prepared 6 images into {prepared} (6 written, 0 already done, 3 skipped)")
    assert lines[start + 1].startswith("skipped cut.png: not a readable image (OSError: ")
    assert lines[start + 2].startswith("skipped notes.txt: not a readable image (UnidentifiedImageError: ")
    assert lines[start + 3] == f"skipped zz_copy.png: the same pixels as {good[1].name} (prepared once: copies could sit " \
                               "in both training and validation)"


def test_missing_data_root_is_one_line_and_leaves_no_folder(tmp_path):
    """The start made <out>/.lock and <out>/checkpoints/ (and the folders above), which stayed; a folder
    that was there keeps what it held."""
    env = {k: v for k, v in os.environ.items() if k != "JPEG_RESTORE_DATA_ROOT"}
    proc = run([sys.executable, MAIN, *SMOKE, "--out", str(tmp_path / "new" / "out")], env)
    assert proc.returncode == 2 and "error: no data root" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    proc = run([sys.executable, MAIN, *SMOKE, "--out", str(tmp_path / "mine")], env)
    assert proc.returncode == 2 and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_a_run_that_fails_as_it_starts_its_mlflow_run_ends_it_failed(tiles_dir, tmp_path):
    """The run's config.toml cannot be written (a folder of that name): the MLflow run just begun stayed RUNNING."""
    (tmp_path / "out" / "config.toml").mkdir(parents=True)
    env = env_for(tmp_path)
    proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--out", str(tmp_path / "out")], env)
    assert proc.returncode == 2 and "config.toml: Is a directory" in proc.stderr, proc.stderr[-2000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (r,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert r.info.status == "FAILED"


def test_a_best_checkpoint_or_state_folder_that_cannot_be_written_fails_before_the_first_step(tiles_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "checkpoints").write_text("")
    for target, out, message in ((tmp_path / "a_file" / "m.pth", "out", "a_file exists and is not a folder"),
                                 (tmp_path, "out", "is a folder: name the model file"),
                                 ("", "out2", "checkpoints exists and is not a folder")):
        proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--set", f"train.best_checkpoint={target}",
                    "--set", "tracking.enabled=false", "--out", str(tmp_path / out)], env_for(tmp_path))
        assert proc.returncode == 2 and message in proc.stderr and "step 1/" not in proc.stderr, proc.stderr[-2000:]


def test_a_new_run_keeps_the_files_of_a_folder_named_by_mistake(tiles_dir, tmp_path):
    """A site's config.toml (or a curves.png with no run's config beside it) was replaced by the run's."""
    site, plots = tmp_path / "site", tmp_path / "plots"
    site.mkdir()
    plots.mkdir()
    (site / "config.toml").write_text('title = "my site"\n')
    (plots / "curves.png").write_bytes(b"my plot")
    for out, message in ((site, f"{site / 'config.toml'} is not a training run's config: another --out keeps it"),
                         (plots, f"{plots / 'curves.png'} is not a training run's (no config.toml beside it): another --out keeps it")):
        proc = run([sys.executable, MAIN, *smoke_args(tiles_dir), "--set", "tracking.enabled=false", "--out", str(out)], env_for(tmp_path))
        assert proc.returncode == 2 and proc.stderr.strip().endswith(f"error: {message}"), proc.stderr[-2000:]
    assert (site / "config.toml").read_text() == 'title = "my site"\n' and (plots / "curves.png").read_bytes() == b"my plot"
    assert sorted(os.listdir(site)) == ["config.toml"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no data root", "bad config", "missing init_from", "bad MLflow store",
                                  "data every rank loads", "rank 0 fails to write during training"])
def test_an_error_under_torchrun_is_printed_once(tiles_dir, tmp_path, case):
    """No data root for the data rank 0 prepares, a bad config, starting checkpoint or prepared data
    (every rank finds it), a store only rank 0 opens, and a write only rank 0 makes failing at the first
    validation (curves.png is a folder): one error line, and rank 1 exits without a traceback of
    its own instead of dying in a barrier or at the next collective."""
    out, env, args = tmp_path / "out", env_for(tmp_path), smoke_args(tiles_dir)
    if case == "no data root":
        env.pop("JPEG_RESTORE_DATA_ROOT")
        args, extra, message = SMOKE, [], "no data root"
    elif case == "bad config":
        extra, message = ["--set", "optim.lrr=1"], "unknown config key optim.lrr"
    elif case == "missing init_from":
        extra, message = ["--set", f"train.init_from={tmp_path / 'none.pth'}"], "none.pth not found"
    elif case == "bad MLflow store":
        extra, message = ["--set", "tracking.tracking_uri=bogus://x"], "MLflow store bogus://x cannot be used"
    elif case == "data every rank loads":
        extra, message = ["--set", "data.patch_size=4096"], "smaller than data.patch_size 4096"
    else:
        extra, message = [], "cannot write"
        (out / "curves.png").mkdir(parents=True)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                MAIN, *args, *extra, "--out", str(out)], env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "[rank1]" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    # torchrun's closing summary names the line as the root cause (it said "To enable traceback see: <url>")
    assert proc.stderr.rstrip().splitlines()[-2] == f"  traceback : {errors[0]}", proc.stderr[-1500:]
    if case.startswith("rank 0"):
        assert "validation at step 3" in proc.stderr and "curves.png" in errors[0]


def test_resume_rejects_other_architectures_and_passes_over_a_corrupt_state(smoke_run, tmp_path, tiles_dir):
    out, env, _ = smoke_run
    work = tmp_path / "out"
    shutil.copytree(out / "checkpoints", work / "checkpoints")
    # a copy of the store: the resume continues the smoke run's MLflow run, which other tests read
    shutil.copy(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_more_ranks_than_gpus_is_one_line(tiles_dir, tmp_path):
    """torchrun --nproc_per_node=4 on a machine with fewer GPUs: each rank without one says so in a
    line, not CUDA's 'invalid device ordinal' traceback."""
    nproc = torch.cuda.device_count() + 1
    proc = run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                MAIN, *smoke_args(tiles_dir), "--out", str(tmp_path / "out")], env_for(tmp_path))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and f"wants GPU {nproc - 1} (LOCAL_RANK), this machine has {nproc - 1}" in errors[0], proc.stderr[-3000:]
    assert "invalid device ordinal" not in proc.stderr
