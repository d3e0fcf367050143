"""The MLflow store under concurrent writers (a sweep's tasks): no run and no metric lost."""
import subprocess
import sys

import mlflow
import pytest

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


def test_compare_shows_latency_columns_only_where_a_run_has_them():
    from train.compare import markdown

    row = {"run": "dncnn", "arch": "dncnn", "status": "FINISHED", "params_m": 0.556, "macs_per_pixel_k": 554.0,
           "train_time_min": 0.75, "images_per_s": 3000.0, "best_val_psnr": 32.1, "best_val_ssim": 0.9,
           "cpu_ms_512": None, "gpu_ms_512": None, "psnr_q10": 29.0, "ssim_q10": 0.81, "psnrb_q10": 28.5,
           **{f"{m}_q{q}": None for q in (20, 30, 40) for m in ("psnr", "ssim", "psnrb")}}
    assert "GPU ms" not in markdown([row], {}, "live1_gray")
    timed = {**row, "run": "unet", "gpu_ms_512": 2.4}
    lines = markdown([row, timed], {"psnr_q10": 27.77, "ssim_q10": 0.773, "psnrb_q10": 25.33}, "live1_gray").splitlines()
    assert "GPU ms 512²" in lines[0] and "CPU ms" not in lines[0]
    assert len({line.count("|") for line in lines}) == 1  # every row as wide as the header
    assert "| 2.4 |" in lines[-1] and "| - |" in lines[-2]
