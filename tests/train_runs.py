"""Helpers for the tests that launch training as users do (train/main.py in a subprocess)."""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import os
import pty
import resource
import shutil
import struct
import subprocess
import tempfile
import termios
from pathlib import Path

import mlflow
import torch

from runtime.models import tiny_kwargs
from train.loop.state import latest_state

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "train" / "main.py")
# the smoke run with the registry's test-size DnCNN: the config's 17 layers x 64 channels spent 8 of a
# smoke run's 19 s on 2 cores in its convolutions, most of them validating (the tests that need a
# large model say so)
SMOKE = ["--config", str(REPO / "configs" / "dncnn.toml"), "--smoke", "--set", "data.backend=torch",
         *(arg for key, value in tiny_kwargs("dncnn").items() for arg in ("--set", f"model.kwargs.{key}={value}"))]


def smoke_args(tiles: Path) -> list[str]:
    """The smoke run on the photograph tiles instead of the config's Train400."""
    return [*SMOKE, "--set", f"data.dataset={tiles}"]


@functools.cache
def _empty_store() -> Path:
    """An MLflow SQLite store with its tables and nothing in them, made once per test process."""
    folder = tempfile.mkdtemp(prefix="empty_mlflow_store_")
    atexit.register(shutil.rmtree, folder, True)
    mlflow.MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()  # creates the tables
    return Path(folder) / "mlflow.db"


def private_store(tmp: Path) -> str:
    """The URI of an MLflow store of its own in `tmp`: a copy of an empty one, as a run's first use
    of a new store leaves it (its tables take 2 s of each training process to create; the tests
    that name their own store, as the quickstart's, still have them created)."""
    db = tmp / "mlflow.db"
    if not db.exists():
        shutil.copy(_empty_store(), db)
    return f"sqlite:///{db}"


def env_for(tmp: Path) -> dict:
    """An empty data root (nothing is read from it) and a private MLflow store."""
    (tmp / "empty_root").mkdir(exist_ok=True)
    return {**os.environ, "JPEG_RESTORE_DATA_ROOT": str(tmp / "empty_root"), "MLFLOW_TRACKING_URI": private_store(tmp)}


def run(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def run_on_terminal(args: list[str], env: dict | None = None, timeout: int = 300) -> tuple[int, str, str]:
    """(exit code, what stderr showed on a terminal, stdout) of a command run as a user runs it, its
    stderr on a terminal of 160 columns (in one 0 columns wide, as a bare pty is, tqdm draws nothing)."""
    terminal, child_end = pty.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=child_end, text=True)
    os.close(child_end)
    shown = bytearray()
    with contextlib.suppress(OSError):  # EIO once the command has closed the terminal
        while chunk := os.read(terminal, 1 << 16):
            shown += chunk
    os.close(terminal)
    stdout = proc.communicate(timeout=timeout)[0]
    return proc.returncode, shown.decode(errors="replace"), stdout


def mlflow_run(env: dict, run_id: str):
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient().get_run(run_id)


def final_weights(out: Path, part: str = "model") -> dict:
    return torch.load(latest_state(out / "checkpoints"), weights_only=True)[part]


def limited_memory(gib: float, env: dict | None = None) -> dict:
    """subprocess.run arguments for a process the host refuses past `gib` of address space (RLIMIT_AS,
    as `ulimit -v` sets; a real ENOMEM, as past what Linux overcommits), with few threads and malloc
    arenas so that a many-core machine's baseline stays well under it."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (int(gib * 2**30),) * 2)

    return {"preexec_fn": limit, "env": {**(env or os.environ), "OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2"}}
