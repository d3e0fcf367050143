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


def test_fits_says_whether_a_call_carrying_paths_stays_within_64_mib(tmp_path):
    """Measured here before a session's calls: the checkout travels with what a call carries."""
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    (small / "a.jpg").write_bytes(b"x" * 1000)
    with open(large, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: its size, not its blocks, is what travels
    fits = subprocess.run(["bash", "scripts/gpu/fits.sh", str(small)], cwd=ROOT, capture_output=True, text=True)
    assert fits.returncode == 0 and fits.stdout.startswith("fits: checkout ") and "of 64 MiB" in fits.stdout, fits.stderr
    over = subprocess.run(["bash", "scripts/gpu/fits.sh", str(small), str(large)], cwd=ROOT, capture_output=True, text=True)
    assert over.returncode == 1 and over.stderr.startswith("too large: checkout ") and "carried 64.0 MiB" in over.stderr, over.stderr
    missing = subprocess.run(["bash", "scripts/gpu/fits.sh", str(small), str(tmp_path / "unstaged")], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.startswith(f"missing {tmp_path / 'unstaged'}: bash scripts/gpu/stage.sh"), missing.stderr


def test_stage_with_data_only_copies_the_data_and_its_halves_without_the_wheels(tmp_path):
    """Plan D carries data only: staging it takes seconds, where the DALI parts take minutes and the network."""
    checkout, data = tmp_path / "checkout", tmp_path / "data"
    (checkout / "scripts/gpu").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/gpu/stage.sh", checkout / "scripts/gpu/stage.sh")
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    for folder in ("train400", "live1_gray", "train_color", "live1_color"):
        (data / folder).mkdir(parents=True)
        for i in range(3):
            (data / folder / f"{i}.png").write_bytes(folder.encode())
    proc = subprocess.run(["bash", "scripts/gpu/stage.sh", str(data)], cwd=checkout, env=dict(os.environ, DATA_ONLY="1"),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "staged the data" in proc.stdout, proc.stderr
    staged = checkout / ".gpu"
    assert all(len(list((staged / "data" / f).iterdir())) == 3 for f in ("train400", "live1_gray", "train_color", "live1_color"))
    halves = [sorted(p.name for p in (staged / h / "train_color").iterdir()) for h in ("data_a", "data_b")]
    assert halves == [["0.png", "2.png"], ["1.png"]]
    assert not (staged / "wheels").exists() or not any((staged / "wheels").iterdir())
    assert not any((staged / "parts").iterdir())
