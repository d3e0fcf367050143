"""scripts/gpu/call.sh, the one command of each GPU-machine call, without the GPU: what a call
carries in .gpu/ is kept under $WORK for the later calls (the carried paths are gone by then), and
an unknown step is logged and the call still packs its results."""
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def call(checkout: Path, work: Path, out: Path, *steps: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), GPU_WORK=str(work), GPU_DRY_RUN="1")
    return subprocess.run(["bash", str(checkout / "scripts/gpu/call.sh"), *steps], env=env, capture_output=True, text=True)


def test_carried_data_accumulates_across_calls_and_is_never_overwritten(tmp_path):
    checkout, work = tmp_path / "checkout", tmp_path / "work"
    (checkout / "scripts/gpu").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/gpu/call.sh", checkout / "scripts/gpu/call.sh")
    first = checkout / ".gpu/data/train_color"
    first.mkdir(parents=True)
    (first / "a.jpg").write_bytes(b"first half")
    (first / "same.jpg").write_bytes(b"kept")
    assert call(checkout, work, tmp_path / "out1", "progress").returncode == 0
    shutil.rmtree(checkout / ".gpu")  # the next call's transfer removes what the last one carried
    second = checkout / ".gpu/data_b/train_color"  # the other half of a folder too large for one call
    second.mkdir(parents=True)
    (second / "b.jpg").write_bytes(b"second half")
    (second / "same.jpg").write_bytes(b"must not replace")
    proc = call(checkout, work, tmp_path / "out2", "progress", "nosuchstep")
    merged = work / "data/train_color"
    assert sorted(p.name for p in merged.iterdir()) == ["a.jpg", "b.jpg", "same.jpg"]
    assert (merged / "same.jpg").read_bytes() == b"kept"
    assert proc.returncode == 2 and "unknown step nosuchstep" in proc.stdout
    assert "unknown step nosuchstep" in (tmp_path / "out2/log").read_text() and (tmp_path / "out2/results.tgz").is_file()
