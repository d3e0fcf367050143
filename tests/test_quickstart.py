"""The README's main job (python -m train.quickstart) end to end, on the embedded photographs."""
from __future__ import annotations

import json
import os
import sys

import pytest
from train_runs import run

from runtime.checkpoint import load_model


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
