"""train.quality_bound: a model's gains above its trained qualities on its own validation split,
the bound it records in the checkpoint, and restore keeping to that bound."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.config import DataConfig
from data_pipeline.images import jpeg_bytes
from data_pipeline.prepare import prepare, split_of, split_records
from runtime import checkpoint as ckpt
from runtime.models import build_model, tiny_kwargs
from train.quality_bound import proposed_bound, validation_images

REPO = Path(__file__).resolve().parent.parent


def tiny_gray_unet(path: Path, data: dict, **extra) -> Path:
    model = build_model("unet", channels=1, **tiny_kwargs("unet"))
    blob = ckpt.model_checkpoint(model, "unet", tiny_kwargs("unet"), "gray", {"data": data}, {}, 0)
    ckpt.save({**blob, **extra}, path)
    return path


def run(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_the_bound_is_the_last_quality_of_an_unbroken_run_of_gains():
    gains = {45: (1.5, 0.0), 50: (1.2, 0.0), 55: (0.3, 0.05), 60: (0.1, 0.3), 65: (0.5, 0.0)}
    assert proposed_bound(gains, 40, min_gain=0.2, max_losing=0.1) == 55  # 65 gains again, after 60 failed
    assert proposed_bound(gains, 40, min_gain=0.2, max_losing=0.0) == 50  # 55: 5% of the images lose
    assert proposed_bound(gains, 40, min_gain=2.0, max_losing=0.1) == 40  # none: the trained maximum


def test_cli_measures_on_the_validation_split_and_records_the_bound(tiles_dir, tmp_path):
    data = {"dataset": str(tiles_dir), "mode": "gray", "qualities": [10, 40], "online": False,
            "val_fraction": 0.3, "min_size": 48}
    model = tiny_gray_unet(tmp_path / "m.pth", data)
    held_out = sum(split_of(p.stem, 0.3) == "val" for p in tiles_dir.glob("*.png"))
    proc = run("train.quality_bound", model)  # an untrained model gains nothing: the bound stays at q40
    assert proc.returncode == 0, proc.stderr
    assert f"{held_out} validation images, trained on q10-40" in proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines() if line.strip()[:2].isdigit()] == [str(q) for q in range(45, 100, 5)]
    assert "bound: q40" in proc.stdout and "restore_max_quality" not in ckpt.load(model)  # nothing written without --write
    proc = run("train.quality_bound", model, "--min-gain", "-100", "--max-losing", "1", "--write")
    assert proc.returncode == 0, proc.stderr
    blob = ckpt.load(model)
    assert blob["restore_max_quality"] == 95 and sorted(map(int, blob["quality_gains"])) == list(range(45, 100, 5))
    assert ckpt.load_model(model)[1]["restore_max_quality"] == 95  # the weights still load


def test_cli_errors_are_one_line(tmp_path, in_process):
    from train.quality_bound import main

    unknown = tiny_gray_unet(tmp_path / "n.pth", {})
    proc = in_process(main, unknown)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {unknown} does not say which qualities it was trained on"
    high = tiny_gray_unet(tmp_path / "h.pth", {"dataset": "x", "qualities": [95, 99], "online": False})
    proc = in_process(main, high)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {high} was trained up to q99: there is nothing above it to measure"
    for option in (["--max-losing", "2"], ["--max-losing", "-0.5"], ["--min-gain", "nan"]):  # were measured and --write-able
        proc = in_process(main, high, *option)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --min-gain must be a number of dB and --max-losing"), proc.stderr


def test_restore_keeps_to_the_recorded_bound(photo_pair, tmp_path):
    data = {"qualities": [10, 20, 30, 40], "online": False}
    model = tiny_gray_unet(tmp_path / "m.pth", data, restore_max_quality=60)
    inp = tmp_path / "in"
    inp.mkdir()
    for q in (40, 60, 90):
        (inp / f"q{q}.jpg").write_bytes(jpeg_bytes(photo_pair[0][:96, :128], q))
    proc = run("serve_bench.restore", inp, "-o", tmp_path / "out", "--checkpoint", model)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q40.png", "q60.png"]
    assert proc.stderr.strip() == (f"left {inp / 'q90.jpg'} as it is: JPEG q90 is above q60, the highest quality at which "
                                   "the model still gained on its validation images (--max-quality 100 restores it anyway)")
    color = tmp_path / "color.pth"  # a gray photo stored as RGB passes the color model's bound, but the gray model restores it
    rgb = build_model("unet", channels=3, **tiny_kwargs("unet"))
    ckpt.save({**ckpt.model_checkpoint(rgb, "unet", tiny_kwargs("unet"), "rgb", {"data": data}, {}, 0), "restore_max_quality": 80}, color)
    stored_as_rgb = tmp_path / "rgb" / "gray.jpg"
    stored_as_rgb.parent.mkdir()
    stored_as_rgb.write_bytes(jpeg_bytes(np.repeat(photo_pair[0][:96, :128, None], 3, axis=2), 70))
    proc = run("serve_bench.restore", stored_as_rgb, "-o", tmp_path / "out_rgb", "--checkpoint", model, "--color-checkpoint", color)
    assert proc.returncode == 0 and "JPEG q70 is above q60" in proc.stderr and not (tmp_path / "out_rgb" / "gray.png").exists()
    bad = tiny_gray_unet(tmp_path / "bad.pth", data, restore_max_quality="high")
    proc = run("serve_bench.restore", inp, "-o", tmp_path / "bad", "--checkpoint", bad)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: restore_max_quality must be a JPEG quality in 1..100, got 'high'"


def test_restore_takes_a_jpeg_saved_again_after_a_worse_one(photo_pair, tmp_path):
    """Above the bound, a JPEG whose pixels still carry a q20 JPEG's 8x8 blocks is restored; a photo
    saved once at that quality is left, and --max-quality (the user's own bound) has no exceptions."""
    model = tiny_gray_unet(tmp_path / "m.pth", {"qualities": [10, 20, 30, 40], "online": False})
    photo = photo_pair[0][:96, :128]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "once.jpg").write_bytes(jpeg_bytes(photo, 90))
    (inp / "again.jpg").write_bytes(jpeg_bytes(np.asarray(Image.open(io.BytesIO(jpeg_bytes(photo, 20)))), 90))
    proc = run("serve_bench.restore", inp, "-o", tmp_path / "out", "--checkpoint", model)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["again.png"]
    assert "again.jpg ->" in proc.stdout and "JPEG q90, re-saved after a worse JPEG (8x8 blockiness " in proc.stdout
    assert proc.stderr.strip().startswith(f"left {inp / 'once.jpg'} as it is: JPEG q90 is above the q10-40")
    proc = run("serve_bench.restore", inp, "-o", tmp_path / "bounded", "--checkpoint", model, "--max-quality", "80")
    assert proc.returncode == 0 and "restored 0 of 2 images" in proc.stdout and "2 left as they are" in proc.stdout


def test_validation_images_are_those_preparation_holds_out(tiles_dir, tmp_path, caplog):
    """A copy under a later name is dropped by preparation even where it falls in validation, and so
    is a flat image (a black frame). An image below PSNR-B's 16 px a side (data.min_size 8 keeps it)
    is held out but passed over by validation, which crashed on it after the first training steps."""
    from train.loop.validation import held_out_items
    src = tmp_path / "src"
    src.mkdir()
    tiles = sorted(tiles_dir.glob("*.png"))[:12]
    for p in tiles:
        (src / p.name).write_bytes(p.read_bytes())
    first = tiles[0].stem
    copies = [f"{first}_copy{i}" for i in range(40)]
    for name in [n for n in copies if split_of(n, 0.3) == "val"][:2]:  # sort after their twin, and are held out
        (src / f"{name}.png").write_bytes(tiles[0].read_bytes())
    black, tiny = [n for n in (f"a{i}" for i in range(40)) if split_of(n, 0.3) == "val"][:2]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(src / f"{black}.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 14), np.uint8)).save(src / f"{tiny}.png")
    data = {"dataset": str(src), "mode": "gray", "qualities": [10], "online": False, "val_fraction": 0.3, "min_size": 8}
    prepared = tmp_path / "prepared"
    held_out = [r["name"] for r in split_records(prepare(src, prepared, "gray", [10], 0.3, min_size=8, progress=False), "val")]
    assert black not in held_out and tiny in held_out
    validated = [n for n in held_out if n != tiny]
    assert sorted(validation_images({"config": {"data": data}}, None)) == validated
    assert sorted(validation_images({"config": {"data": {**data, "limit": 3}}}, None)) == [n for n in held_out[:3] if n != tiny]
    with caplog.at_level("WARNING", logger="train.loop.validation"):
        items = held_out_items(DataConfig(prepared_dir=str(prepared), qualities=[10], min_size=8))
    assert sorted(name for name, *_ in items) == validated
    assert f"passed over 1 held-out image(s) smaller than the 16 px a side PSNR-B needs: {tiny}.png (14x12)" in caplog.text
