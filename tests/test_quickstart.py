"""The README's main job (python -m train.quickstart) end to end, on the embedded photographs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_runs import REPO, run

from runtime.checkpoint import load_model
from runtime.device import resolve_precision


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
    assert res["precision"] == resolve_precision("auto", torch.device("cpu"))  # as it trained: bf16 where native
    assert len(list((tmp_path / "qs" / "side_by_side").glob("*.png"))) == 2
    assert load_model(tmp_path / "qs" / "run" / "image_compression_model.pth")[1]["arch"] == "unet"


@pytest.mark.slow
def test_a_stopped_quickstart_says_so_and_continues_when_run_again(tmp_path):
    """SIGTERM while training: the state is saved and the command ends as stopped (128 + 15), not
    with an evaluation of a model that does not exist yet; the same command continues."""
    env = {k: v for k, v in os.environ.items() if k != "JPEG_RESTORE_DATA_ROOT"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "train.quickstart", "--out", str(tmp_path / "qs"), "--steps", "100"]
    log = tmp_path / "log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        deadline = time.time() + 300
        while "step 5/100" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    lines = log.read_text().strip().splitlines()
    assert code == 128 + signal.SIGTERM and lines[-1].startswith("stopped at step "), "\n".join(lines[-20:])
    assert not any(line.startswith("error:") for line in lines)
    stopped_at = int(lines[-1].split()[3])
    again = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in again.stderr:
        if "resumed from" in line or "starting at step 0" in line:
            break
    again.send_signal(signal.SIGTERM)
    again.wait(120)
    assert f"at step {stopped_at} " in line, line


@pytest.mark.parametrize("args", [["--steps", "0"], ["--eval-size", "-1"], ["--eval-size", "3"]])
def test_quickstart_checks_its_options_before_training(tmp_path, args):
    """--eval-size 3 or -1 failed in a traceback after the training (SSIM's window, an empty crop)."""
    proc = run([sys.executable, "-m", "train.quickstart", "--out", str(tmp_path / "qs"), *args], dict(os.environ))
    assert proc.returncode == 2 and proc.stderr.startswith("error: --steps must be at least 1 and --eval-size 0"), proc.stderr[-2000:]
    assert not (tmp_path / "qs").exists()  # nothing prepared or trained
