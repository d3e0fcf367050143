"""Bad inputs and faults, as a careless or hostile user would cause them: nothing lost, nothing
overwritten, one-line errors (the defects of the fault battery, each with its test)."""
from __future__ import annotations

import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_runs import limited_memory, run_on_terminal

from data_pipeline.config import DataConfig
from data_pipeline.errors import out_of_memory
from data_pipeline.images import atomic_write_bytes, jpeg_bytes, jpeg_roundtrip, rgb_to_luma
from data_pipeline.prepare import load_manifest, prepare
from data_pipeline.sources import DataError
from runtime import checkpoint as ckpt
from runtime.models import build_model, build_problem, tiny_kwargs
from runtime.tiling import tile_count
from train.loop.state import OutputLock, remove_partial_writes

REPO = Path(__file__).resolve().parents[1]


def tiny_unet(path: Path, config: dict | None = None) -> Path:
    model = build_model("unet", channels=1, **tiny_kwargs("unet"))
    ckpt.save(ckpt.model_checkpoint(model, "unet", tiny_kwargs("unet"), "gray", config or {}, {}, 0), path)
    return path


def restore_process(*args) -> subprocess.CompletedProcess:
    """restore in a process of its own: for what it measures of itself (memory), shows a pipe or filters as it is imported."""
    return subprocess.run([sys.executable, "-m", "serve_bench.restore", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.fixture
def restore(in_process):
    """restore(*args): the restore command in this process (conftest's in_process)."""
    from serve_bench.restore import main

    return lambda *args: in_process(main, *args)


@pytest.fixture
def jpegs(tmp_path, photo_pair) -> Path:
    """a/photo.jpg, b/photo.jpg and a/photo.png: three inputs with one stem."""
    gray = photo_pair[0][:96, :128]
    for sub, name in (("a", "photo.jpg"), ("b", "photo.jpg"), ("a", "photo.png")):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / name).write_bytes(jpeg_bytes(gray, 10))
    return tmp_path


def test_restore_never_overwrites_a_file_it_did_not_make(jpegs, tmp_path, restore):
    model = tiny_unet(tmp_path / "m.pth")
    unrelated = jpegs / "a" / "cat.png"
    unrelated.write_bytes(b"someone's picture")
    (jpegs / "a" / "cat.jpg").write_bytes((jpegs / "a" / "photo.jpg").read_bytes())
    proc = restore(jpegs / "a" / "cat.jpg", "-o", jpegs / "a", "--checkpoint", model)
    assert proc.returncode == 1 and "already exists (--overwrite replaces it)" in proc.stderr
    assert unrelated.read_bytes() == b"someone's picture"
    proc = restore(jpegs / "a" / "cat.jpg", "-o", jpegs / "a", "--checkpoint", model, "--overwrite")
    assert proc.returncode == 0 and Image.open(unrelated).size == (128, 96)


def test_restore_gives_same_stem_inputs_distinct_outputs(jpegs, tmp_path, restore):
    model = tiny_unet(tmp_path / "m.pth")
    out = tmp_path / "out"
    proc = restore(jpegs / "a" / "photo.jpg", jpegs / "b" / "photo.jpg", jpegs / "a" / "photo.png", "-o", out,
                   "--checkpoint", model)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["photo-2.png", "photo-3.png", "photo.png"]
    assert "restored 3 of 3" in proc.stdout
    assert proc.stdout.count("JPEG q10,") == 3  # the quality read from each file's own tables
    # a file named twice, or named and in a named folder (restore a/photo.jpg a/), is restored once
    proc = restore(jpegs / "b" / "photo.jpg", jpegs / "b", jpegs / "b" / ".." / "b" / "photo.jpg", "-o", tmp_path / "once",
                   "--checkpoint", model)
    assert proc.returncode == 0 and sorted(p.name for p in (tmp_path / "once").iterdir()) == ["photo.png"], proc.stderr
    assert "restored 1 of 1" in proc.stdout
    (tmp_path / "bad.jpg").write_text("not an image")  # nothing restored: the folder the check made goes again
    proc = restore(tmp_path / "bad.jpg", "-o", tmp_path / "none", "--checkpoint", model)
    assert proc.returncode == 1 and "restored 0 of 1 images (nothing written);" in proc.stdout and not (tmp_path / "none").exists()


def test_restore_of_a_folder_takes_what_pillow_opens_and_names_the_rest(jpegs, tmp_path, photo_pair, restore):
    model = tiny_unet(tmp_path / "m.pth")
    folder = jpegs / "a"
    Image.fromarray(photo_pair[0][:64, :64]).save(folder / "web.webp")
    (folder / "notes.txt").write_text("not a picture")
    (folder / ".hidden.jpg").write_bytes(b"editor's lock file")
    (folder / "2024").mkdir()
    shutil.copy(folder / "photo.jpg", folder / "2024" / "deeper.jpg")
    (folder / "moved.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    proc = restore(folder, "-o", tmp_path / "out", "--checkpoint", model)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo-2.png", "photo.png", "web.png"]
    assert "passed over 1 file(s) of the input folders that are not images (notes.txt)" in proc.stderr
    assert "passed over 1 link(s) of the input folders to files that do not exist (moved.jpg)" in proc.stderr
    assert "passed over 1 subfolder(s) of the input folders, which are not searched (2024/)" in proc.stderr
    assert ".hidden" not in proc.stderr and "restored 3 of 3 images" in proc.stdout
    # a folder with nothing to restore is an error, not "restored 0 of 0"
    (folder / "2024" / "deeper.jpg").unlink()
    proc = restore(folder / "2024", "-o", tmp_path / "out3", "--checkpoint", model)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: no images to restore in {folder / '2024'}"
    (tmp_path / "nested").mkdir()
    (folder / "2024").rename(tmp_path / "nested" / "2024")
    proc = restore(tmp_path / "nested", "-o", tmp_path / "out3", "--checkpoint", model)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "passed over 1 subfolder(s) of the input folders, which are not searched (2024/)",
        f"error: no images to restore in {tmp_path / 'nested'}"]


def test_restore_recursive_mirrors_the_subfolders_and_leaves_its_own_output_out(jpegs, tmp_path, restore):
    model = tiny_unet(tmp_path / "m.pth")
    folder = jpegs / "a"
    (folder / "2024" / "june").mkdir(parents=True)
    shutil.copy(folder / "photo.jpg", folder / "2024" / "photo.jpg")  # the stem of a/photo.jpg, in another folder
    shutil.copy(folder / "photo.jpg", folder / "2024" / "june" / "beach.jpg")
    (folder / ".thumbnails").mkdir()
    shutil.copy(folder / "photo.jpg", folder / ".thumbnails" / "small.jpg")
    (folder / "linked").symlink_to(jpegs / "b")
    out = folder / "restored"  # inside the folder it restores
    proc = restore(folder, "-o", out, "--recursive", "--checkpoint", model)
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["2024/june/beach.png", "2024/photo.png", "photo-2.png", "photo.png"], written
    assert "passed over 1 subfolder(s) of the input folders, which are not searched (linked/)" in proc.stderr
    proc = restore(folder, "-o", out, "--recursive", "--checkpoint", model)  # its own PNGs are not inputs the next time
    assert proc.returncode == 1 and "restored 0 of 4 images (nothing written)" in proc.stdout, proc.stdout


def test_a_folder_that_cannot_be_read_is_a_skip_or_one_line(jpegs, tmp_path):
    """A subfolder restore cannot list is a reported skip under --recursive; a folder named to restore,
    evaluate or prepare is one error line (all were tracebacks). Root reads every folder: the commands
    run without the capabilities that let it."""
    drop = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root reads every folder, and setpriv (util-linux), which would take that away, is missing")
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    model = tiny_unet(tmp_path / "m.pth")
    locked = jpegs / "a" / "locked"
    locked.mkdir()
    locked.chmod(0)

    def run(module, *args):
        return subprocess.run([*drop, sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300)
    try:
        proc = run("serve_bench.restore", jpegs / "a", "--recursive", "-o", tmp_path / "out", "--checkpoint", model)
        assert proc.returncode == 0 and "passed over 1 subfolder(s) that cannot be read (locked/: Permission denied)" in proc.stderr, proc.stderr
        assert "restored 2 of 2 images" in proc.stdout
        for module, args in (("serve_bench.restore", [locked, "-o", tmp_path / "out2", "--checkpoint", model]),
                             ("train.evaluate", ["--dataset", locked, "--jpeg-only"]),
                             ("data_pipeline.prepare", [locked, "--out", tmp_path / "out2"])):
            proc = run(module, *args)
            assert proc.returncode == 2 and proc.stderr.strip() == f"error: cannot read folder {locked}: Permission denied", (module, proc.stderr)
            assert not (tmp_path / "out2").exists()
    finally:
        locked.chmod(0o755)


def test_restore_keeps_a_camera_jpegs_orientation_profile_and_exif(tmp_path, photo_pair, capsys):
    """A phone stores its JPEG sideways with an EXIF orientation tag and a color profile: the PNG
    stands as viewers showed the input (restored on the stored block grid, then turned) and keeps both."""
    from serve_bench.restore import main

    model = tiny_unet(tmp_path / "m.pth")
    stored = photo_pair[1][:64, :96]  # color: the gray model restores its luma
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "PhoneCam"  # Orientation: shown turned 90 degrees clockwise; Make
    icc = b"a color profile"  # Pillow stores the bytes as they are
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(stored).save(inp / "tagged.jpg", quality=10, exif=exif.tobytes(), icc_profile=icc)
    Image.fromarray(stored).save(inp / "plain.jpg", quality=10)
    assert main([str(inp), "-o", str(tmp_path / "out"), "--checkpoint", str(model)]) == 0
    assert "turned as its EXIF orientation says" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "tagged.png") as tagged, Image.open(tmp_path / "out" / "plain.png") as plain:
        assert tagged.size == (64, 96) and plain.size == (96, 64)
        assert np.array_equal(np.asarray(tagged), np.rot90(np.asarray(plain), k=-1))
        assert tagged.info["icc_profile"] == icc and "icc_profile" not in plain.info
        assert dict(tagged.getexif()) == {0x010F: "PhoneCam"} and not plain.getexif()


def test_restore_names_a_damaged_exif_on_its_files_line(tmp_path, photo_pair):
    """Pillow warned "Corrupt EXIF data" on stderr, naming no file and once a process: now the
    file's line says its EXIF could not all be read and that it was not turned. In a process of its
    own: the filter that data_pipeline.images sets as it is imported is gone in pytest's."""
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"  # 5 entries, 1 there, cut
    Image.fromarray(photo_pair[0][:96, :128]).save(tmp_path / "cut_exif.jpg", quality=20, exif=exif)
    proc = restore_process(tmp_path / "cut_exif.jpg", "-o", tmp_path / "out", "--checkpoint", tiny_unet(tmp_path / "m.pth"))
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr[-2000:]
    assert "cut_exif.png (128x96, JPEG q20, unet gray, torch " in proc.stdout
    assert "EXIF not all readable (Corrupt EXIF data. Expecting to read 12 bytes but only got 8): not turned)" in proc.stdout, proc.stdout


def test_restore_tells_a_conditioned_model_the_quality_given(tmp_path, photo_pair, capsys):
    """--quality: for a PNG of a decoded JPEG (no tables, so blind by default) or a photo saved
    again at a higher quality; a blind model refuses it."""
    from runtime.inference import Restorer
    from serve_bench.restore import main

    torch.manual_seed(0)
    kwargs = {**tiny_kwargs("unet"), "cond_channels": 1}
    told_model = tmp_path / "told.pth"
    model = build_model("unet", channels=1, **kwargs)
    torch.nn.init.normal_(model.head.weight, std=0.3)  # a fresh residual U-Net returns its input (zero head)
    ckpt.save(ckpt.model_checkpoint(model, "unet", kwargs, "gray", {"data": {"qualities": [10, 40]}}, {}, 0), told_model)
    jpeg = jpeg_roundtrip(photo_pair[0][:64, :96], 10)
    (tmp_path / "in").mkdir()
    Image.fromarray(jpeg).save(tmp_path / "in" / "decoded.png")
    restored = {}
    for told in (None, 10, 40):
        assert main([str(tmp_path / "in"), "-o", str(tmp_path / f"out{told}"), "--checkpoint", str(told_model),
                     "--precision", "fp32", *(["--quality", str(told)] if told else [])]) == 0  # as the Restorer below
        restored[told] = np.asarray(Image.open(tmp_path / f"out{told}" / "decoded.png"))
    assert "no JPEG tables, told q40" in capsys.readouterr().out
    assert np.array_equal(restored[10], Restorer(told_model)(jpeg, 10)) and np.array_equal(restored[None], Restorer(told_model)(jpeg))
    assert not np.array_equal(restored[10], restored[40]) and not np.array_equal(restored[None], restored[10])
    once = tmp_path / "once.jpg"  # a photo saved once at q90: above the q10-40 trained, left alone
    once.write_bytes(jpeg_bytes(photo_pair[0][:64, :96], 90))
    assert main([str(once), "-o", str(tmp_path / "o"), "--checkpoint", str(told_model)]) == 0
    assert "JPEG q90 is above the q10-40" in capsys.readouterr().err and not (tmp_path / "o" / "once.png").exists()
    resaved = tmp_path / "resaved.jpg"  # q10 artifacts saved again at q90: its blocks show it, restored blind unless told
    resaved.write_bytes(jpeg_bytes(jpeg, 90))
    assert main([str(resaved), "-o", str(tmp_path / "r"), "--checkpoint", str(told_model), "--precision", "fp32"]) == 0
    assert "JPEG q90, re-saved after a worse JPEG" in capsys.readouterr().out
    decoded = np.asarray(Image.open(resaved))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r" / "resaved.png")), Restorer(told_model)(decoded))
    assert main([str(resaved), "-o", str(tmp_path / "r10"), "--checkpoint", str(told_model), "--quality", "10",
                 "--precision", "fp32"]) == 0
    assert "JPEG q90, told q10" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r10" / "resaved.png")), Restorer(told_model)(decoded, 10))
    blind = tiny_unet(tmp_path / "blind.pth")
    assert main([str(tmp_path / "in"), "-o", str(tmp_path / "x"), "--checkpoint", str(blind), "--quality", "10"]) == 2
    assert f"{blind} is blind" in capsys.readouterr().err and not (tmp_path / "x" / "decoded.png").exists()


def test_restore_leaves_jpegs_above_the_models_training_qualities(tmp_path, photo_pair, restore):
    """The shipped model (q10-40) makes a q90 photo worse: such a file is reported and left alone."""
    model = tiny_unet(tmp_path / "m.pth", {"data": {"qualities": [10, 20, 30, 40], "online": False}})
    inp = tmp_path / "in"
    inp.mkdir()
    for q in (10, 40, 90):
        (inp / f"q{q}.jpg").write_bytes(jpeg_bytes(photo_pair[0][:96, :128], q))
    proc = restore(inp, "-o", tmp_path / "out", "--checkpoint", model)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q10.png", "q40.png"]
    assert proc.stderr.strip() == (f"left {inp / 'q90.jpg'} as it is: JPEG q90 is above the q10-40 the model was trained "
                                   "on, where it would lose detail (--max-quality 100 restores it anyway)")
    assert "restored 2 of 3 images" in proc.stdout and "1 left as they are" in proc.stdout
    proc = restore(inp, "-o", tmp_path / "all", "--checkpoint", model, "--max-quality", "100")
    assert proc.returncode == 0 and "restored 3 of 3" in proc.stdout
    proc = restore(inp, "-o", tmp_path / "low", "--checkpoint", model, "--max-quality", "20")
    assert proc.returncode == 0 and "restored 1 of 3" in proc.stdout and "above --max-quality 20" in proc.stderr
    proc = restore(inp, "-o", tmp_path / "bad", "--checkpoint", model, "--max-quality", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --max-quality must be a JPEG quality in 1..100, got 0"
    proc = restore(inp, "-o", tmp_path / "bad", "--checkpoint", model, "--tiles-per-call", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --tiles-per-call must be positive, got 0"


def test_restore_checks_its_output_folder_before_running_the_model(jpegs, tmp_path, restore):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    proc = restore(jpegs / "a" / "photo.jpg", "-o", a_file, "--checkpoint", tmp_path / "missing.pth")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: output {a_file} exists and is not a folder"
    proc = restore(jpegs / "a" / "photo.jpg", "-o", "/sys/jpeg-restore-out", "--checkpoint", tmp_path / "missing.pth")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: cannot write into output folder /sys/jpeg-restore-out")


def test_a_second_training_on_a_busy_out_stops_at_once(tmp_path):
    held = OutputLock(tmp_path).acquire()
    try:
        with pytest.raises(ckpt.CheckpointError, match=rf"{tmp_path} is in use by another training \(.*\"pid\": {os.getpid()}"):
            OutputLock(tmp_path).acquire()
    finally:
        held.release()
    OutputLock(tmp_path).acquire().release()  # free again


def test_a_lock_file_removed_while_it_was_being_taken_is_taken_again(tmp_path, monkeypatch):
    """A command that fails removes the lock file it made; a training that opened that file just before
    locked a file no longer at the path, and a third could then lock the new one beside it."""
    import fcntl

    real_flock, calls = fcntl.flock, []

    def flock_as_the_file_is_replaced(f, op):
        calls.append(op)
        if len(calls) == 1:  # between this process's open and its flock, the failing holder's undo ran
            (tmp_path / ".lock").unlink()
            (tmp_path / ".lock").touch()
        return real_flock(f, op)

    monkeypatch.setattr(fcntl, "flock", flock_as_the_file_is_replaced)
    held = OutputLock(tmp_path).acquire()
    try:
        assert os.path.samestat(os.fstat(held.file.fileno()), os.stat(tmp_path / ".lock")) and len(calls) == 2
    finally:
        held.release()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    code = f"from train.loop.state import OutputLock; OutputLock({str(tmp_path)!r}).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert (tmp_path / ".lock").is_file()
    OutputLock(tmp_path).acquire().release()


def test_written_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o600


def test_partial_writes_of_a_killed_process_are_removed(tmp_path):
    (tmp_path / ".step_00000010.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "step_00000008.pt").write_bytes(b"kept")
    assert [p.name for p in remove_partial_writes(tmp_path)] == [".step_00000010.pt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000008.pt"]


def test_prepare_redoes_a_same_size_corrupted_output(real_images, tmp_path):
    out = tmp_path / "prep"
    prepare(real_images, out, "gray", [10], progress=False)
    rec = load_manifest(out)["files"][0]
    jpeg = out / rec["jpeg"]["10"]["path"]
    good = jpeg.read_bytes()
    jpeg.write_bytes(bytes(len(good)))  # same size, other content
    prepare(real_images, out, "gray", [10], progress=False)
    assert jpeg.read_bytes() == good


def test_an_unusable_source_names_the_reason(real_images, tmp_path):
    with pytest.raises(DataError, match="grayscale image, but the dataset mode is rgb; all reasons in"):
        prepare(real_images, tmp_path / "prep", "rgb", [10], progress=False)
    assert (tmp_path / "prep" / "report.json").is_file()


class Payload:  # a pickled object a weights-only load refuses
    pass


def test_checkpoint_errors_keep_torchs_trust_warning(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"format": ckpt.FORMAT, "thing": Payload()}, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model(path)
    assert "only if you trust its source" in str(err.value) and "\n" not in str(err.value)
    assert "Payload" in str(err.value)


def _half_a_checkpoint(path):
    path.write_bytes(tiny_unet(path).read_bytes()[:2000])


def _foreign_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a model")


@pytest.mark.parametrize("write, reason", [
    (lambda p: p.write_bytes(b""), "an empty file (0 bytes)"),
    (lambda p: p.write_text("hello"), "neither torch's zip format nor a pickle (starts with b'hell')"),
    (_half_a_checkpoint, "a zip archive torch cannot read as a checkpoint (PytorchStreamReader failed"),
    (_foreign_zip, "a zip archive torch cannot read as a checkpoint (file in archive is not in a subdirectory"),
    (lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=4)), "not a pickle torch can read"),
])
def test_a_garbage_checkpoint_gets_one_line_saying_what_it_is(tmp_path, recwarn, write, reason):
    path = tmp_path / "garbage.pth"
    write(path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} is corrupt or not a torch checkpoint: {reason}"), message
    assert "\n" not in message and "trust" not in message and not recwarn.list


def test_a_training_state_given_as_a_model_is_named(tmp_path):
    state = tmp_path / "run" / "checkpoints" / "step_00000012.pt"
    state.parent.mkdir(parents=True)
    ckpt.save({"model": {}, "optimizer": {}, "step": 12}, state)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model(state)
    assert str(err.value) == (f"{state} is a training state (step 12) for --resume, not a model: by default its run's "
                              f"model is {tmp_path / 'run' / 'image_compression_model.pth'}")


@pytest.mark.parametrize("change, message", [
    ({"kwargs": {**tiny_kwargs("unet"), "width": 20000}}, "weights do not fit unet"),
    ({"mode": "cmyk"}, "channel mode 'cmyk'"),
    ({"kwargs": {"width": "wide"}}, "width must be of type int"),
    ({"kwargs": {**tiny_kwargs("unet"), "width": -4}}, "width must be 0 or more, got -4"),
    ({"kwargs": {**tiny_kwargs("unet"), "levels": 0}}, r"cannot rebuild unet\(.*\): unet\(.*levels=0.*\) cannot be built"),
    ({"arch": "vgg"}, "unknown architecture 'vgg'"),
])
def test_hostile_checkpoints_are_refused_before_building(tmp_path, change, message):
    path = tiny_unet(tmp_path / "m.pth")
    blob = torch.load(path, weights_only=True)
    blob.update(change)
    ckpt.save(blob, path)
    build_problem("unet", tiny_kwargs("unet"))  # torch's one-time imports for meta kernels (64 MB) before measuring
    tracemalloc.start()
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_model(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20  # nothing of the 14 GB a width-20000 U-Net would need


def test_luma_of_a_huge_photo_needs_bands_not_gigabytes():
    rgb = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)  # 12 megapixels
    tracemalloc.start()
    y = rgb_to_luma(rgb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * y.nbytes  # the output and one band's float64 arithmetic (~70 MB), not the whole photo's (~600 MB)
    assert np.array_equal(y[:7], rgb_to_luma(rgb[:7], rows=3))


@pytest.mark.slow
def test_restore_takes_a_12_megapixel_photo_in_batched_tiles_with_progress(tmp_path, photo_pair):
    big = np.asarray(Image.fromarray(photo_pair[0]).resize((4000, 3000), Image.BICUBIC))
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(big, 20))
    model = tiny_unet(tmp_path / "m.pth")
    args = [sys.executable, "-m", "serve_bench.restore", str(tmp_path / "big.jpg"), "-o", str(tmp_path / "out"),
            "--checkpoint", str(model), "--tiles-per-call", "3"]
    code, shown, stdout = run_on_terminal(args)  # stderr on a terminal, as when a user runs it
    assert code == 0, shown[-2000:]
    assert Image.open(tmp_path / "out" / "big.png").size == (4000, 3000)
    n = tile_count(3000, 4000)
    # the progress bar over 9 x 7 tiles (its last refresh may be skipped under load: leave=False clears it)
    assert n == 63 and re.search(rf"\b[1-9]\d*/{n} \[", shown) and "tile/s" in shown, shown[-1000:]
    rss = int(stdout.split("peak memory ")[1].split(" MiB host")[0])
    assert rss < 2048  # bounded: tiles, not the whole 12-megapixel image through the model at once
    # into a log (a pipe, a file) no bar: its redraws would run together there
    proc = restore_process(tmp_path / "big.jpg", "-o", tmp_path / "again", "--checkpoint", model, "--tiles-per-call", "3")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-1000:]


def gray_ramp(side: int) -> np.ndarray:
    """A side x side diagonal ramp, quick to encode."""
    ramp = np.arange(side, dtype=np.uint16) % 256
    return ((ramp[:, None] + ramp[None, :]) // 2).astype(np.uint8)


@pytest.fixture
def huge_gray() -> np.ndarray:
    """13000x13000: 169 MP, under the 179 MP cap."""
    return gray_ramp(13000)


def test_restore_skips_an_image_that_does_not_fit_in_memory_and_goes_on(tmp_path, huge_gray, photo_pair):
    """Out of memory on one image (a traceback, and the images after it were not restored): a reported skip."""
    (tmp_path / "huge.jpg").write_bytes(jpeg_bytes(huge_gray, 20))
    (tmp_path / "small.jpg").write_bytes(jpeg_bytes(photo_pair[0][:96, :128], 20))
    proc = subprocess.run([sys.executable, "-m", "serve_bench.restore", tmp_path / "huge.jpg", tmp_path / "small.jpg",
                           "-o", tmp_path / "out", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, **limited_memory(2))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"skipped \S*huge.jpg: out of memory restoring it \(13000x13000\) on cpu: the host refused [\d,]+ MiB more",
                     proc.stderr), proc.stderr[-2000:]
    assert (tmp_path / "out" / "small.png").is_file() and not (tmp_path / "out" / "huge.png").exists()
    assert "restored 1 of 2 images" in proc.stdout


def test_a_command_out_of_memory_is_one_line(tmp_path):
    """64 MP: evaluated by the shipped model it needs 1.75 to 2 GiB of address space, an evaluate of
    a small image 1 to 1.25, so at 1.5 the model runs out with room either way; its JPEG's metrics,
    scored before the model runs, take 12 s (26 s at 169 MP)."""
    (tmp_path / "test").mkdir()
    Image.fromarray(gray_ramp(8000)).save(tmp_path / "test" / "huge.png", compress_level=1)
    proc = subprocess.run([sys.executable, "-m", "train.evaluate", "--dataset", tmp_path / "test", "--qualities", "10"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, **limited_memory(1.5))
    assert proc.returncode == 2 and proc.stderr.startswith("error: out of memory (") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]


def test_out_of_memory_names_what_ran_out():
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB")
    assert out_of_memory(gpu) == str(gpu)  # torch's class, raised on GPUs only
    host = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 838860800 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory(host) == "the host refused 800 MiB more"
    assert out_of_memory(MemoryError()) == "the host refused an allocation"
    assert out_of_memory(RuntimeError("shapes do not match")) is None and out_of_memory(ValueError("x")) is None
    from torch._dynamo.exc import BackendCompilerFailed  # torch.compile's, around an error of its compiler

    assert out_of_memory(BackendCompilerFailed(lambda gm, inputs: gm, gpu, None)) == str(gpu)
    wrapped = RuntimeError("a wrapper")
    wrapped.__cause__ = host  # raise ... from host
    assert out_of_memory(wrapped) == "the host refused 800 MiB more"
    # oneDNN says only "could not create a primitive", a refused allocation among its causes (1 of 3
    # trainings under a 4 GiB limit failed so): memory, where the process is near its limit
    onednn = RuntimeError("could not create a primitive")
    assert out_of_memory(onednn) is None  # here: no limit, memory to spare
    code = ("import resource, re\nfrom data_pipeline.errors import out_of_memory\n"
            "used = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (int(used * 1.5),) * 2)\n"
            "print(out_of_memory(RuntimeError('could not create a primitive')))")
    near_limit = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert re.fullmatch(r"oneDNN could not create a primitive, [\d.]+ of the process's [\d.]+ GiB address-space limit in use\n",
                        near_limit.stdout), near_limit.stderr[-2000:]


@pytest.mark.slow
def test_restore_of_a_large_color_photo_holds_few_copies_of_it(tmp_path):
    """A 48 MP RGB JPEG through a tiny RGB U-Net took 44 bytes a pixel more than a small photo (uint8
    in, its float copy, the float output, a float weight sum, a float copy to round it, what malloc
    keeps of them), now 34: no weight image, the input freed and the output rounded a plane at a time.
    Measured on 12 MP (half the time of 24 MP; the bytes a pixel the same: 33.1, and 33.6 at 24 MP)."""
    model = build_model("unet", channels=3, **tiny_kwargs("unet"))
    ckpt.save(ckpt.model_checkpoint(model, "unet", tiny_kwargs("unet"), "rgb", {}, {}, 0), tmp_path / "rgb.pth")
    h, w = 4000, 3000
    ramp = np.add.outer(np.arange(h) % 256, np.arange(w) % 256) // 2
    photo = np.stack([ramp, ramp[::-1], 255 - ramp], axis=2).astype(np.uint8)
    peaks = {}
    for name, img in (("small", photo[:256, :256]), ("large", photo)):
        Image.fromarray(img).save(tmp_path / f"{name}.jpg", quality=30)
        proc = restore_process(tmp_path / f"{name}.jpg", "-o", tmp_path / name, "--checkpoint", tmp_path / "rgb.pth", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[name] = int(proc.stdout.split("peak memory ")[1].split(" MiB host")[0]) * 2**20
    per_pixel = (peaks["large"] - peaks["small"]) / (h * w)
    assert 12 < per_pixel < 38, per_pixel  # at least the float output


def test_restore_reports_its_own_peak_memory_not_its_parents(tmp_path, photo_pair):
    """getrusage's peak RSS carries over from the parent through fork and exec: restore started by
    a 2 GB process (pytest) reported 2 GB for a 96x128 JPEG."""
    (tmp_path / "small.jpg").write_bytes(jpeg_bytes(photo_pair[0][:96, :128], 20))
    ballast = np.ones(1536 * 2**20, dtype=np.uint8)  # 1.5 GB resident in this process
    proc = restore_process(tmp_path / "small.jpg", "-o", tmp_path / "out", "--checkpoint", tiny_unet(tmp_path / "m.pth"), "--device", "cpu")
    assert proc.returncode == 0 and ballast.all(), proc.stderr[-2000:]
    assert int(proc.stdout.split("peak memory ")[1].split(" MiB host")[0]) < 1024, proc.stdout


@pytest.mark.parametrize("module, args, message", [
    ("train.benchmark", ["--arch", "nope"], "error: unknown architecture 'nope'; known: arcnn,"),
    ("train.benchmark", ["--steps", "0"], "error: --steps, --batch, --patch, --workers and --repeats must be at least 1"),
    ("train.benchmark", ["--loaders", "--repeats", "0"], "error: --steps, --batch, --patch, --workers and --repeats must be at least 1, got 12, 32, 64,"),
    ("train.benchmark", ["--end-to-end", "--repeats", "2"], "error: --repeats does nothing in --end-to-end"),
    ("train.benchmark", ["--loaders", "--modes", "grey"], "error: --modes takes gray, rgb, got 'grey'"),
    ("train.benchmark", ["--end-to-end", "--backends", "resident,nope"], "error: unknown loader backend(s) nope: choose from"),
    ("train.benchmark", ["--end-to-end", "--kwargs", "{width=}"], "error: --kwargs must be a TOML inline table"),
    ("train.benchmark", ["--end-to-end", "--kwargs", "{foo = 1}"], "error: --kwargs: foo is not an argument of dncnn"),
    ("train.benchmark", ["--end-to-end", "--kwargs", "{width = -8}"], "error: --kwargs: width must be 0 or more, got -8"),
    ("train.benchmark", ["--end-to-end", "--arch", "drunet", "--kwargs", "{levels = 0}"],
     "error: --kwargs: drunet(levels=0) cannot be built: drunet: levels must be at least 1, got 0"),
    ("train.benchmark", ["--kwargs", "{width = 8}"], "error: --kwargs does nothing in the default benchmark"),
    ("train.benchmark", ["--loaders", "--batch", "8", "--compile"], "error: --compile and --batch do nothing in --loaders"),
    ("train.benchmark", ["--loaders", "--end-to-end"], "error: --loaders and --end-to-end are two benchmarks"),
    ("train.benchmark", ["--peak", "--end-to-end"], "error: --end-to-end and --peak are two benchmarks"),
    ("train.benchmark", ["--peak"], "error: --json does nothing in --peak"),  # the test's --json: --peak writes none
    ("train.benchmark", ["--end-to-end", "--tile", "32"], "error: --tile must be 0 (whole images) or at least --patch 64 (and 16), got 32"),
    ("train.benchmark", ["--loaders", "--tile", "480"], "error: --tile does nothing in --loaders"),
    ("data_pipeline.benchmark", ["--workers", "0"], "error: --workers, --batches and --repeats must be at least 1, got 0, 40 and 3"),
    ("data_pipeline.benchmark", ["--repeats", "0"], "error: --workers, --batches and --repeats must be at least 1, got 2, 40 and 0"),
    ("data_pipeline.benchmark", ["--modes", "grey"], "error: --modes takes gray, rgb, got 'grey'"),
    ("data_pipeline.benchmark", ["--backends", "nope"], "error: unknown loader backend(s) nope: choose from"),
    ("data_pipeline.skimage_testset", ["/proc/jpeg-restore-testset"], "error: cannot write the test set into /proc/"),
    # decoder_check took --qualities x as a traceback and 0 as a quality; evaluate said it in its own words
    ("data_pipeline.decoder_check", ["--qualities", "x"], "error: --qualities must be comma-separated integers or a range like 5-95:5, got 'x'"),
    ("data_pipeline.decoder_check", ["--qualities", "0,10"], "error: --qualities must be in 1..100, got '0,10'"),
    ("train.evaluate", ["--qualities", "10;20"], "error: --qualities must be comma-separated integers or a range like 5-95:5"),
    ("train.evaluate", ["--qualities", "95-105:5"], "error: --qualities must be in 1..100, got '95-105:5'"),
])
def test_benchmark_check_and_testset_commands_reject_bad_options_in_one_line(tmp_path, capsys, module, args, message):
    """Before any measurement starts (a bad --arch used to fail only after every architecture had been timed)."""
    import importlib

    json_args = [] if module.endswith("skimage_testset") else ["--json", str(tmp_path / "bench.json")]
    assert importlib.import_module(module).main([*args, *json_args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bench.json").exists()


def test_decoder_check_of_a_folder_without_images_is_one_line(tmp_path, capsys):
    from data_pipeline.decoder_check import main

    (tmp_path / "empty").mkdir()
    assert main(["--dataset", str(tmp_path / "empty"), "--json", str(tmp_path / "c.json")]) == 2  # was an IndexError
    assert capsys.readouterr().err.strip() == f"error: no images in {tmp_path / 'empty'}"


@pytest.mark.parametrize("module, args", [
    ("data_pipeline.benchmark", ["--modes", "gray,rgb"]),
    ("train.benchmark", ["--loaders", "--modes", "gray,rgb"]),
    ("train.benchmark", ["--end-to-end", "--dataset", "train_color"]),
])
def test_benchmarks_find_a_missing_dataset_before_measuring(tmp_path, tiles_dir, monkeypatch, capsys, module, args):
    """The color set missing was found only once the gray one had been prepared and measured (the
    --end-to-end bare loop timed first: minutes in fp16 on a CPU)."""
    import importlib

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "train400").symlink_to(tiles_dir)
    monkeypatch.chdir(tmp_path)  # prepared datasets would land in outputs/ here
    assert importlib.import_module(module).main([*args, "--data-root", str(tmp_path / "root"), "--json", "b.json"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"error: dataset 'train_color' not found in data root ({tmp_path / 'root' / 'train_color'} is missing)"
    assert out == "" and not (tmp_path / "outputs").exists() and not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("module, args, message", [
    ("train.main", ["--smoke", "--out", "{file}"], "error: output {file} exists and is not a folder"),
    ("train.evaluate", ["--json", "{file}/results.json"], "error: output {file} exists and is not a folder"),
    ("train.evaluate", ["--json", "{tmp}"], "error: --json {tmp} is a folder: name the file to write"),
    ("train.evaluate", ["--side-by-side", "{tmp}/sbs", "--side-by-side-count", "-1"],
     "error: --side-by-side-count must be at least 1, got -1"),
    ("train.evaluate", ["--side-by-side", "{file}"], "error: output {file} exists and is not a folder"),
    ("train.figure", [str(REPO / "image_compression_model.pth"), "--out", "{file}/fig.png"],
     "error: output {file} exists and is not a folder"),
    ("data_pipeline.prepare", ["train400", "--out", "{file}"], "error: output {file} exists and is not a folder"),
    ("train.compare", ["--out", "{file}"], "error: output {file} exists and is not a folder"),
    ("data_pipeline.decoder_check", ["--json", "{file}/check.json"], "error: output {file} exists and is not a folder"),
    ("data_pipeline.decoder_check", ["--json", "{tmp}"], "error: --json {tmp} is a folder: name the file to write"),
    # the benchmarks wrote their JSON only after minutes of measuring
    ("train.benchmark", ["--steps", "1", "--json", "{tmp}"], "error: --json {tmp} is a folder: name the file to write"),
    ("train.benchmark", ["--steps", "1", "--json", "{file}/b.json"], "error: output {file} exists and is not a folder"),
    ("data_pipeline.benchmark", ["--json", "{tmp}"], "error: --json {tmp} is a folder: name the file to write"),
])
def test_commands_check_where_they_write_before_any_work(tmp_path, capsys, module, args, message):
    """A file where an output folder should be: one line at once, not a traceback after the work."""
    import importlib

    file = tmp_path / "a_file"
    file.write_text("the user's")
    fill = {"file": str(file), "tmp": str(tmp_path)}
    assert importlib.import_module(module).main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == message.format(**fill) and file.read_text() == "the user's"


@pytest.mark.parametrize("module, option, args", [
    ("train.ship", "--out", [str(REPO / "image_compression_model.pth")]),
    ("export.to_onnx", "--out", []),
    ("export.to_aoti", "--out", []),
    ("train.figure", "--out", [str(REPO / "image_compression_model.pth")]),
    ("train.evaluate", "--json", []),
    ("train.benchmark", "--json", ["--steps", "1"]),
    ("data_pipeline.benchmark", "--json", []),
    ("data_pipeline.decoder_check", "--json", []),
])
def test_a_file_option_ending_in_a_slash_names_a_folder(tmp_path, capsys, module, option, args):
    """`--out new_folder/` wrote a file named new_folder (Path() drops the slash): the shipped model,
    an ONNX file, a figure or results where the user meant a folder."""
    import importlib

    target = f"{tmp_path}/new_folder/"
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main([*args, option, target])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: argument {option}: {target} names a folder: name the file to write"), err
    assert not any(tmp_path.iterdir())


def test_an_atomic_write_that_cannot_happen_is_one_user_error(tmp_path):
    from data_pipeline.errors import UserError

    (tmp_path / "a_file").write_text("x")
    for target in (tmp_path / "a_file" / "x.json", tmp_path / "a_file" / "sub" / "x.json"):
        with pytest.raises(UserError, match=f"^cannot write {target}: {tmp_path}/a_file exists and is not a folder$"):
            atomic_write_bytes(target, b"{}")
    (tmp_path / "a_folder.png").mkdir()
    with pytest.raises(UserError, match=f"^cannot write {tmp_path}/a_folder.png: Is a directory$"):
        atomic_write_bytes(tmp_path / "a_folder.png", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder.png"]
    assert not any((tmp_path / "a_folder.png").iterdir())


def test_training_refuses_the_test_set(data_root, tiles_dir, tmp_path, capsys):
    """LIVE1 is test only: a run on it stops before preparing anything, and a prepared set that
    holds five of its images (renamed copies, an archive) stops before the first batch."""
    from data_pipeline.config import DataConfig
    from data_pipeline.loaders import training_pairs
    from train.main import main

    run = tmp_path / "run"
    assert main(["--smoke", "--data-root", str(data_root), "--set", "data.dataset=live1_gray", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: source {data_root / 'live1_gray'} holds 29 of LIVE1's 29 images"), err
    assert not (run / "prepared").exists()

    tiles = sorted(tiles_dir.iterdir())
    for n_live1 in (4, 5):
        src = tmp_path / f"mixed{n_live1}"
        src.mkdir()
        names = ["bikes", "house", "monarch", "parrots", "woman"][:n_live1] + [f"own_{i}" for i in range(6)]
        for tile, name in zip(tiles, names):
            shutil.copy(tile, src / f"{name}.png")
        prepare(src, tmp_path / f"prep{n_live1}", "gray", [10], progress=False)
        cfg = DataConfig(prepared_dir=str(tmp_path / f"prep{n_live1}"), qualities=[10], patch_size=32)
        if n_live1 == 4:  # a folder of one's own photos may hold a house.png
            assert len(training_pairs(cfg)) > 0
        else:
            with pytest.raises(DataError, match="holds 5 of LIVE1's 29 images .*: LIVE1 is the test set"):
                training_pairs(cfg)


@pytest.mark.parametrize("module", ["serve_bench.restore", "serve_bench.benchmark", "export.to_aoti", "train.evaluate", "train.quality_bound"])
@pytest.mark.parametrize("device, message", [
    ("gpu", "error: --device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("cuda:99", "error: --device cuda:99: this machine has "),  # no GPU, or fewer than 100
])
def test_a_device_this_machine_lacks_is_one_line_before_any_work(tmp_path, capsys, module, device, message):
    import importlib

    inputs = {"serve_bench.restore": [str(REPO / "docs" / "side_by_side_shipped_gray_q10.png"), "-o", str(tmp_path / "out")],
              "train.quality_bound": [str(REPO / "image_compression_model.pth")]}.get(module, [])
    assert importlib.import_module(module).main([*inputs, "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module, args", [
    ("serve_bench.restore", [str(REPO / "docs" / "side_by_side_shipped_gray_q10.png"), "-o", "out/restored", "--checkpoint", "none.pth"]),
    ("train.evaluate", ["--side-by-side", "out/sbs", "--json", "results/live1.json"]),
    ("data_pipeline.prepare", ["train400", "--out", "out/prepared"]),
    ("train.figure", ["none.pth", "--out", "out/figure.png"]),
])
def test_a_command_that_fails_leaves_no_folder_it_made(tmp_path, monkeypatch, capsys, module, args):
    """Each checked its output folders before any work, making them, and left them empty when it then
    failed (no data root, no checkpoint); a folder that was there stays."""
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JPEG_RESTORE_DATA_ROOT", raising=False)
    (tmp_path / "mine").mkdir()
    assert importlib.import_module(module).main(args) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert os.listdir(tmp_path) == ["mine"]


def test_compare_without_a_store_says_so_and_creates_none(tmp_path, monkeypatch, capsys):
    from train.compare import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--experiment", "jpeg-sweep", "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no MLflow store at {tmp_path / 'mlruns' / 'mlflow.db'} (train a model first, or point " \
                  "MLFLOW_TRACKING_URI at the store)", err
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "cmp").exists()  # nor its --out (it did)


def _store_with_experiment(tmp_path, monkeypatch, name: str):
    """A new SQLite store as $MLFLOW_TRACKING_URI, its client and an experiment `name` in it."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)  # not the store an earlier test of this process set with mlflow.set_tracking_uri
    return client, client.create_experiment(name, artifact_location=str(tmp_path / "artifacts"))


def test_compare_says_how_long_a_running_run_has_been_silent(tmp_path, monkeypatch):
    """A run killed outright (kill -9, the OOM killer) stays RUNNING in MLflow for ever."""
    import time

    from train.compare import collect

    client, experiment = _store_with_experiment(tmp_path, monkeypatch, "silence")
    now_ms = int(time.time() * 1000)
    for name, last_log_ms in (("live", now_ms - 60_000), ("killed", now_ms - 3 * 3600_000), ("stalled", now_ms - 1200_000)):
        run = client.create_run(experiment, start_time=now_ms - 4 * 3600_000, run_name=name)
        for step, ms in ((50, last_log_ms - 60_000), (100, last_log_ms)):
            client.log_metric(run.info.run_id, "images_per_s", 100.0, timestamp=ms, step=step)
    finished = client.create_run(experiment, start_time=now_ms - 4 * 3600_000, run_name="done")
    client.set_terminated(finished.info.run_id, end_time=now_ms - 3 * 3600_000)
    status = {r["run"]: r["status"] for r in collect("silence")[0]}
    assert status == {"live": "RUNNING", "killed": "RUNNING? (nothing logged for 3.0 h: killed?)",
                      "stalled": "RUNNING? (nothing logged for 20 min: killed?)", "done": "FINISHED"}, status


def test_compare_before_any_validation_draws_its_curves_without_a_warning(tmp_path, monkeypatch, capsys):
    """A sweep's first minutes: no run has validated, so there is no curve, and matplotlib warned "No
    artists with labels found to put in legend" into the user's terminal."""
    import warnings

    from train.compare import main

    client, experiment = _store_with_experiment(tmp_path, monkeypatch, "jpeg-sweep")
    run = client.create_run(experiment, run_name="unet-task0")
    client.log_metric(run.info.run_id, "train_loss", 0.1, step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["--out", str(tmp_path / "cmp")]) == 0
    assert "| unet-task0 |" in capsys.readouterr().out and (tmp_path / "cmp" / "val_psnr_curves.png").stat().st_size > 0


def test_compare_names_the_datasets_its_runs_were_evaluated_on_when_asked_for_another(tmp_path, monkeypatch, capsys):
    """--dataset live1-gray (a typo) showed a table without test columns, and no word why."""

    from train.compare import main

    client, experiment = _store_with_experiment(tmp_path, monkeypatch, "jpeg-sweep")
    for dataset in ("live1_gray", "classic5"):
        run = client.create_run(experiment, run_name=f"unet-{dataset}")
        client.log_metric(run.info.run_id, f"{dataset}_model_psnr_q10", 29.3)
    assert main(["--out", str(tmp_path / "cmp")]) == 0
    captured = capsys.readouterr()
    assert "live1_gray q10" in captured.out and "note:" not in captured.err
    assert main(["--dataset", "live1-gray", "--out", str(tmp_path / "cmp")]) == 0
    assert capsys.readouterr().err.strip() == ("note: no run of 'jpeg-sweep' was evaluated on live1-gray; they were on "
                                               "classic5, live1_gray (--dataset NAME)")
    assert "evaluated_on" not in (tmp_path / "cmp" / "compare.csv").read_text()


def test_compare_shows_an_infinite_metric_as_inf(tmp_path, monkeypatch, capsys):
    """MLflow stores inf as the largest float: the table showed a 309-digit PSNR."""
    from train.compare import main

    client, experiment = _store_with_experiment(tmp_path, monkeypatch, "jpeg-sweep")
    run = client.create_run(experiment, run_name="exact")
    client.log_metric(run.info.run_id, "live1_gray_model_psnr_q10", float("inf"))
    assert main(["--out", str(tmp_path / "cmp")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| exact |"))
    assert row.endswith("| inf / - / - |"), row


def test_compare_gives_each_runs_steps_and_flop_rate_and_its_mfu_given_the_peak(tmp_path, monkeypatch, capsys):
    """The equal-time tables' steps, TFLOP/s and MFU columns were copied into the README by hand."""
    from train.compare import main

    client, experiment = _store_with_experiment(tmp_path, monkeypatch, "gpu-minutes")
    for name, last in (("done", 33), ("running", None)):
        run_id = client.create_run(experiment, run_name=name).info.run_id
        for step, tflops in ((10, 50.0), (20, 240.0), (30, 250.0)):  # the first window includes the start-up
            client.log_metric(run_id, "train_tflops", tflops, step=step)
            client.log_metric(run_id, "images_per_s", tflops * 10, step=step)
        if last:
            client.log_metric(run_id, "total_wall_time_s", 45.0, step=last)
            client.set_terminated(run_id)
    assert main(["--experiment", "gpu-minutes", "--out", str(tmp_path / "cmp"), "--peak-tflops", "800"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| steps | img/s | TFLOP/s | MFU (800 TFLOP/s) |" in lines[0], lines[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[6:10] for line in lines[2:4]}
    assert rows == {"done": ["33", "2450.0", "245.000", "30.6%"], "running": ["30", "2450.0", "245.000", "30.6%"]}, rows
    assert main(["--experiment", "gpu-minutes", "--out", str(tmp_path / "cmp")]) == 0
    assert "MFU" not in capsys.readouterr().out
    assert "steps,images_per_s,train_tflops" in (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[0]
    with pytest.raises(SystemExit) as exc:
        main(["--experiment", "gpu-minutes", "--peak-tflops", "0"])
    assert exc.value.code == 2 and "--peak-tflops must be a positive number, got 0" in capsys.readouterr().err


def test_a_new_run_never_writes_over_an_earlier_run(tiles_dir, tmp_path, capsys):
    from train.main import main

    out = tmp_path / "run"
    out.mkdir()
    best = tiny_unet(out / "image_compression_model.pth")
    before = best.read_bytes()
    args = ["--smoke", "--set", f"data.dataset={tiles_dir}", "--set", "tracking.enabled=false", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {out} holds an earlier run (a best model {best}): --resume continues it, another --out "
                   "starts a new run"), err
    assert best.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["image_compression_model.pth"]


def test_a_diverging_run_stops_with_one_line(tiles_dir, tmp_path, capsys):
    """A learning rate of 1e12 makes the loss NaN in three steps: the run stops there, not 10000 steps later."""
    from train.main import main

    out = tmp_path / "run"
    args = ["--smoke", "--set", f"data.dataset={tiles_dir}", "--set", "tracking.enabled=false", "--set", "model.arch=unet",
            "--set", "model.kwargs={width = 8, levels = 2}", "--set", "optim.name=sgd", "--set", "optim.lr=1e12",
            "--set", "train.log_every=1", "--set", "train.max_steps=12", "--set", "train.precision=fp32", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training diverged at step ") and ("loss is nan" in err or "loss is inf" in err), err
    assert err.endswith("(lower optim.lr, set optim.grad_clip); nothing kept from before"), err
    assert not (out / "image_compression_model.pth").exists()


@pytest.mark.parametrize("damage, named", [
    ("truncate", "has {half} bytes, not {size}"),  # a copy cut short: every backend failed its decode mid-run
    ("remove", "is missing"),  # a validation original gone: a FileNotFoundError traceback
])
def test_a_damaged_prepared_folder_is_named_before_training(real_images, tmp_path, capsys, damage, named):
    from data_pipeline.prepare import main as prepare_main
    from train.main import main

    prepared = tmp_path / "prep"
    prepare(real_images, prepared, "gray", [10, 40], val_fraction=0.3, progress=False)
    files = load_manifest(prepared)["files"]
    entry = next(f for f in files if f["split"] == "train")["jpeg"]["40"] if damage == "truncate" else \
        next(f for f in files if f["split"] == "val")["original"]
    path = prepared / entry["path"]
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[:len(good) // 2])
    else:
        path.unlink()

    args = ["--smoke", "--set", f"data.prepared_dir={prepared}", "--set", "data.qualities=[10, 40]",
            "--set", "data.backend=torch", "--set", "tracking.enabled=false"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    said = named.format(half=len(good) // 2, size=len(good))
    assert err.startswith(f"error: {prepared}: 1 prepared file(s) missing or changed since preparation "
                          f"({entry['path']} {said}): prepare it again, which redoes only those: "), err
    again = err.split("redoes only those: ")[1].split()
    assert again[:3] == ["python", "-m", "data_pipeline.prepare"]
    assert prepare_main(again[3:]) == 0 and path.read_bytes() == good
    assert main([*args, "--out", str(tmp_path / "run2")]) == 0


def test_a_prepared_dir_not_prepared_yet_gives_the_command_that_prepares_it(real_images, tmp_path, capsys):
    """data.prepared_dir names a folder training reads, not one it prepares: without a manifest
    there it said only "run python -m data_pipeline.prepare first"; it now gives the command."""
    from data_pipeline.prepare import main as prepare_main
    from train.main import main

    prepared = tmp_path / "shared prep"
    args = ["--smoke", "--set", f"data.dataset={real_images}", "--set", f"data.prepared_dir={prepared}", "--set", "data.qualities=[10, 40]",
            "--set", "data.val_fraction=0.3", "--set", "tracking.enabled=false"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: no manifest.json in {prepared} (data.prepared_dir): prepare it first: python -m data_pipeline.prepare "), err
    assert err.endswith(", or leave data.prepared_dir empty to prepare into <out>/prepared"), err
    command = err.split("prepare it first: ")[1].split(", or leave")[0]
    assert prepare_main(shlex.split(command)[3:]) == 0
    assert main([*args, "--out", str(tmp_path / "run")]) == 0


def test_a_run_on_a_prepared_dir_records_the_split_it_was_prepared_with(real_images, tmp_path, caplog):
    """A folder prepared at val_fraction 0.3 trained by a config saying 0.5 (and the default dataset)
    used the folder's split but recorded the config's: train.ship compares validation PSNRs only
    between runs of one recorded held-out set, and train.quality_bound rebuilds that set from it."""
    from train.main import main

    prepared = tmp_path / "prep"
    prepare(real_images, prepared, "gray", [10], val_fraction=0.3, progress=False)
    args = ["--smoke", "--set", f"data.prepared_dir={prepared}", "--set", "data.qualities=[10]", "--set", "data.val_fraction=0.5",
            "--set", "data.min_size=100", "--set", "tracking.enabled=false", "--out", str(tmp_path / "run")]
    with caplog.at_level("INFO"):
        assert main(args) == 0
    said = [r.getMessage() for r in caplog.records if "was prepared from" in r.getMessage()]
    assert said and said[0].endswith(f"{prepared} was prepared from {real_images} with data.val_fraction 0.3, data.min_size 48, "
                                     "data.tile_size 0: "
                                     "the run takes them from there (the config said data.dataset train400, data.val_fraction 0.5, data.min_size 100)"), said
    data = ckpt.load(tmp_path / "run" / "image_compression_model.pth")["config"]["data"]
    assert (data["dataset"], data["val_fraction"], data["min_size"]) == (str(real_images), 0.3, 48)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main([*args, "--resume", "--set", "train.max_steps=8"]) == 0  # takes them again: no setting changed
    assert "resumed with changed settings: train.max_steps: 6 -> 8" in [r.getMessage() for r in caplog.records]


def test_a_run_with_tiles_prepares_them_apart_and_records_the_tiling(real_images, tmp_path, caplog):
    """data.tile_size: the run prepares its source in tiles into a folder of their own (a folder in
    whole images, or in other tiles, is not mixed), trains on the tiles, validates whole images."""
    from data_pipeline.loaders import training_pairs
    from train.main import main

    args = ["--smoke", "--set", f"data.dataset={real_images}", "--set", "data.qualities=[10]", "--set", "data.val_fraction=0.3",
            "--set", "tracking.enabled=false"]
    assert main([*args, "--set", "data.tile_size=96", "--out", str(tmp_path / "run")]) == 0
    prepared = tmp_path / "run" / "prepared" / f"{real_images.name}-gray-tile96"
    manifest = load_manifest(prepared)
    assert manifest["tile_size"] == 96 and all(("tiles" in f) == (f["split"] == "train") for f in manifest["files"])
    data = ckpt.load(tmp_path / "run" / "image_compression_model.pth")["config"]["data"]
    assert data["tile_size"] == 96 and len(training_pairs(DataConfig(**{**data, "prepared_dir": str(prepared)}))) == 4 * 9
    assert main([*args, "--out", str(tmp_path / "run2"), "--set", f"data.prepared_dir={prepared}"]) == 0
    assert ckpt.load(tmp_path / "run2" / "image_compression_model.pth")["config"]["data"]["tile_size"] == 96
    with pytest.raises(ValueError, match=r"data.tile_size must be 0 \(whole images\) or at least data.patch_size 64 \(and 16\), got 48"):
        DataConfig(tile_size=48)


def test_a_rank_that_leaves_the_error_line_to_another_waits_for_it_to_print():
    """torchrun stops every rank once one has failed: a silent rank that left at once could kill the
    rank printing the error before its line (2 of 20 two-process runs with a bad config on a loaded
    2-core CPU showed no line at all). It waits until torchrun ends it, silently."""
    import signal
    import time

    code = ("import sys\nfrom data_pipeline.errors import ReportedElsewhere, command\n"
            "@command\ndef main(argv=None):\n    print('failing', flush=True)\n"
            "    raise ReportedElsewhere('rank 0 prints it')\nsys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline() == "failing\n"
    time.sleep(1)
    assert proc.poll() is None, proc.stderr.read()  # still waiting for the printing rank
    proc.terminate()  # as torchrun does once that rank has exited
    assert proc.wait(timeout=10) == -signal.SIGTERM and proc.stderr.read() == ""


def test_converting_dncnn3_from_a_folder_or_a_missing_file_is_one_line(tmp_path):
    """h5py's own message for a folder ran over two lines, and called a missing file 'not a MatConvNet net'."""
    script = str(REPO / "scripts" / "convert_dncnn3.py")
    for mat, said in ((tmp_path, f"error: {tmp_path} is a folder: name DnCNN3.mat in it"),
                      (tmp_path / "DnCNN3.mat", f"error: {tmp_path / 'DnCNN3.mat'} not found")):
        r = subprocess.run([sys.executable, script, str(mat), str(tmp_path / "dncnn3.pth")], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 1 and r.stderr.strip() == said, r.stderr
    assert not (tmp_path / "dncnn3.pth").exists()
