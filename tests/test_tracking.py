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
