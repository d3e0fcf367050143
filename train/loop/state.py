"""Training state on disk: `<out>/checkpoints/step_XXXXXXXX.pt` (everything `--resume` needs, two
kept), and the lock that keeps two trainings out of one output folder."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from data_pipeline.errors import undo_on_failure
from data_pipeline.images import check_output_folder
from runtime import checkpoint as ckpt

log = logging.getLogger(__name__)
STATE_RE = re.compile(r"step_(\d{8})\.pt$")


def state_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def states(directory: Path) -> list[Path]:
    """Training-state files, oldest first."""
    directory = Path(directory)
    return sorted(p for p in directory.glob("step_*.pt") if STATE_RE.search(p.name)) if directory.is_dir() else []


def latest_state(directory: Path) -> Path | None:
    found = states(directory)
    return found[-1] if found else None


def load_latest(directory: Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest training state that loads; a corrupt newer one is reported and passed over."""
    found = states(directory)
    errors = []
    for path in reversed(found):
        try:
            state = ckpt.load(path, map_location)
        except ckpt.CheckpointError as exc:
            errors.append(str(exc))
            log.warning("%s; trying the previous training state", exc)
            continue
        if errors:
            log.warning("resuming from the older state %s (the newer one is unusable)", path.name)
        return path, state
    if errors:
        raise ckpt.CheckpointError(f"no usable training state in {directory}: {'; '.join(errors)}")
    return None


def prune_states(directory: Path, keep: int = 2) -> None:
    for p in states(directory)[:-keep]:
        p.unlink(missing_ok=True)


class OutputLock:
    """An exclusive lock on an output folder (flock on `<out>/.lock`, released by the kernel when
    the holder dies, so a stale lock is taken over). The file names the holder for the error. A
    command that fails removes the lock file it made: a lock taken on a file since removed is taken again."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self.file = None

    def acquire(self) -> "OutputLock":
        check_output_folder(self.path.parent)
        if not self.path.exists():
            undo_on_failure(lambda: self.path.unlink(missing_ok=True))
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise ckpt.CheckpointError(f"{self.path.parent} is in use by another training ({holder}); "
                                           "wait for it or choose another --out") from None
            try:
                if os.path.samestat(os.fstat(f.fileno()), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            f.close()  # its holder removed the file as it let go: the lock is on the path's file now
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def remove_partial_writes(*folders: Path) -> list[Path]:
    """Temp files of atomic writes that a killed process left (`.<name>.<random>.tmp`); only call
    while holding the folder's lock."""
    removed = []
    for folder in folders:
        if Path(folder).is_dir():
            for p in Path(folder).glob(".*.tmp"):
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("removed %d partial files of an interrupted write: %s", len(removed), ", ".join(p.name for p in removed))
    return removed
