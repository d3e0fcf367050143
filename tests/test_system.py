"""Worker pools and threads against the system (data_pipeline/system.py): sized by the cores this
process may use, and gone when their parent is killed outright."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.onnx_export import export_onnx
from runtime import checkpoint as ckpt
from runtime.models import build_model, tiny_kwargs

REPO = Path(__file__).resolve().parents[1]


def test_onnx_runtime_threads_follow_the_cores_the_process_may_use(tmp_path):
    """Slurm's --cpus-per-task and taskset allow fewer cores than the machine has (os.cpu_count()):
    ONNX Runtime's threads and the worker pools follow the allowed ones."""
    model = build_model("dncnn", **tiny_kwargs("dncnn"))
    ckpt.save(ckpt.model_checkpoint(model, "dncnn", tiny_kwargs("dncnn"), "gray", {}, {}, 0), tmp_path / "m.pth")
    export_onnx(tmp_path / "m.pth", tmp_path / "m.onnx")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import torch; "
            "from data_pipeline.system import usable_cpus; from runtime.runners import make_runner; "
            "from train.loop.distributed import DistInfo; from train.loop.validation import metric_workers; "
            f"print(usable_cpus(), make_runner('onnxruntime', {str(tmp_path / 'm.onnx')!r}).threads, "
            "metric_workers(DistInfo(0, 0, 1, torch.device('cuda', 0))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "1", "0"], proc.stderr[-2000:]


@pytest.mark.parametrize("scoring", [
    # the validation's spawned workers ignore stop signals: nothing else would end them
    """Validator(DataConfig(prepared_dir=PREPARED, qualities=[10], limit=2), "fp32", LOSSES["l1"],
              DistInfo(0, 0, 1, torch.device("cpu")), workers=2)(torch.nn.Identity()); killed()""",
    # evaluate's workers would wait forever for work
    """evaluate({"a": np.full((64, 64), 128, np.uint8)}, [10], restore=killed, workers=2)""",
    # and so would prepare's (a pool even for the 100 tiles), killed as soon as they are there
    """data_pipeline.prepare.IMAGES_PER_WORKER = 1; threading.Thread(target=killed_once_pooled, daemon=True).start(); """
    """prepare(TILES, OUT, workers=2, progress=False)"""],
    ids=["validation", "evaluate", "prepare"])
def test_pool_workers_die_with_a_parent_killed_outright(tiles_dir, tiles_prepared, tmp_path, scoring):
    """After the OOM killer or `timeout -k` kills the trainer, evaluate or prepare, their pools' processes go too."""
    script = tmp_path / "killed.py"
    script.write_text(f"""import multiprocessing, os, signal, threading, time, numpy as np, torch
import data_pipeline.prepare
from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare
from train.evaluate import evaluate
from train.loop.distributed import DistInfo
from train.loop.optim import LOSSES
from train.loop.validation import Validator
PREPARED, TILES, OUT = {str(tiles_prepared)!r}, {str(tiles_dir)!r}, {str(tmp_path / "prepared")!r}
def killed(*_):
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
def killed_once_pooled():
    while not multiprocessing.active_children():
        time.sleep(0.001)
    killed()
if __name__ == "__main__":
    {scoring}
""")
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:  # files: workers left alive would hold pipes open
        proc = subprocess.run([sys.executable, str(script)], stdout=stdout, stderr=stderr, timeout=120, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, err.read_text()[-2000:]
    workers = [int(pid) for pid in out.read_text().split()]
    assert workers

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))


@pytest.mark.parametrize("pool", ["evaluate", "training", "quickstart", "quality_bound"])
def test_a_metric_worker_starts_without_torch(pool):
    """A spawned worker imports its command's main module again before it runs anything: the metric
    workers of evaluate, the trainer, the quickstart and quality_bound each imported torch, 1.6 s
    and 230 MB a worker before it scored anything, where 0.2-0.3 s and 30-41 MB do. Here as spawn
    prepares a worker, then the modules of what the pool runs in it."""
    from data_pipeline.system import start_worker
    from runtime.metrics import image_metrics
    from train import evaluate

    main, run = {"evaluate": ({"init_main_from_name": "train.evaluate"}, [evaluate._jpeg_metrics, evaluate.ImageFile]),
                 "training": ({"init_main_from_path": str(REPO / "train" / "main.py")}, [image_metrics]),
                 "quickstart": ({"init_main_from_name": "train.quickstart"}, [evaluate._jpeg_metrics]),
                 "quality_bound": ({"init_main_from_name": "train.quality_bound"}, [evaluate._jpeg_metrics])}[pool]
    modules = [f.__module__ for f in (start_worker, *run)]
    code = (f"import importlib, multiprocessing.spawn, sys\nmultiprocessing.spawn.prepare({main!r})\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'mlflow', 'nvidia.dali') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stdout + proc.stderr[-2000:]
