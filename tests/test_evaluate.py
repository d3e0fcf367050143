import io
import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from data_pipeline.images import jpeg_roundtrip
from runtime.metrics.psnr import psnr
from train.evaluate import evaluate, load_test_images, main

# ../shared/data/README.md, q = 10 / 20 / 30 / 40
PUBLISHED_GRAY = {
    "psnr": [27.77, 30.07, 31.41, 32.35],
    "ssim": [0.773, 0.851, 0.885, 0.904],
    "psnrb": [25.33, 27.57, 28.92, 29.96],
}
PUBLISHED_COLOR_PSNR = [25.69, 28.06, 29.37, 30.28]
QUALITIES = [10, 20, 30, 40]


def test_cli_reproduces_the_published_jpeg_baseline_on_live1_gray(data_root, tmp_path):
    out = tmp_path / "live1.json"
    r = subprocess.run([sys.executable, "-m", "train.evaluate", "--data-root", str(data_root), "--dataset", "live1_gray",
                        "--qualities", "10,20,30,40", "--jpeg-only", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    res = json.loads(out.read_text())
    assert res["dataset"] == "live1_gray" and res["images"] == 29
    for i, q in enumerate(QUALITIES):
        jpeg = res["results"][str(q)]["jpeg"]
        assert jpeg["psnr"] == pytest.approx(PUBLISHED_GRAY["psnr"][i], abs=0.01)
        assert jpeg["ssim"] == pytest.approx(PUBLISHED_GRAY["ssim"][i], abs=0.001)
        # Yim-Bovik BEF as in the QGAC/KAIR code: 25.329 / 27.561 / 28.916 / 29.948 here; the README's
        # figures are rounded to 0.01 and their exact implementation is not given (see README).
        assert jpeg["psnrb"] == pytest.approx(PUBLISHED_GRAY["psnrb"][i], abs=0.015)


def test_live1_color_jpeg_psnr(data_root):
    images, skipped = load_test_images(data_root / "live1_color")
    assert not skipped and all(im.color for im in images.values())
    results, _ = evaluate(images, QUALITIES)
    for i, q in enumerate(QUALITIES):
        assert results[str(q)]["jpeg"]["psnr"] == pytest.approx(PUBLISHED_COLOR_PSNR[i], abs=0.01)


def test_restorer_results_and_side_by_side(tiles_dir, tmp_path):
    images, _ = load_test_images(tiles_dir)
    images = {k: images[k] for k in sorted(images)[:2]}
    results, extra = evaluate(images, [10], restore=lambda jpeg, q: jpeg, keep=1)
    assert results["10"]["model"] == results["10"]["jpeg"]  # identity restorer: no gain
    assert set(results["10"]["model"]) == {"psnr", "ssim", "psnrb"}  # every registered metric
    from train.evaluate import write_side_by_side
    [png] = write_side_by_side(extra["kept"], tmp_path)
    assert png.name == f"{sorted(images)[0]}_q10.png" and png.stat().st_size > 10_000


def test_a_side_by_side_of_a_huge_image_shows_its_centre_on_the_block_grid(photo_pair):
    """Three panels of a 60 MP photo made a 180 MP strip, over what Pillow (and restore) open."""
    from runtime.figures import label_height, side_by_side
    gray = photo_pair[0]  # 512x512
    jpeg = jpeg_roundtrip(gray, 10)
    cap = 3 * 128 * (128 + label_height(128))
    strip = Image.open(io.BytesIO(side_by_side(gray, jpeg, gray, "astronaut q10", max_pixels=cap)))
    assert strip.size == (3 * 128, 128 + label_height(128))
    assert np.array_equal(np.asarray(strip.convert("L"))[label_height(128):, :128], gray[192:320, 192:320])
    whole = Image.open(io.BytesIO(side_by_side(gray, jpeg, gray, "astronaut q10")))
    assert whole.size == (3 * 512, 512 + label_height(512))


def test_cli_missing_data_root_is_one_line(tmp_path, in_process):
    r = in_process(main, "--data-root", tmp_path / "nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: data root {tmp_path / 'nope'} does not exist or is not a directory"]


def test_unreadable_test_images_are_reported(tiles_dir, tmp_path):
    (tmp_path / "a.png").write_bytes(next(tiles_dir.glob("*.png")).read_bytes())
    (tmp_path / "b.png").write_bytes(b"garbage")
    images, skipped = load_test_images(tmp_path)
    assert list(images) == ["a"] and len(skipped) == 1 and skipped[0].startswith("b.png: not a readable image")


def test_flat_and_tiny_test_images_are_skipped_and_the_means_stay_finite(tiles_dir, tmp_path, capsys):
    """A black frame in a test set: its JPEG is exact, so its PSNR (and the set's mean) was infinite
    and the gain over JPEG -inf. An image under 11 px a side stopped the run with SSIM's traceback;
    under 16, PSNR-B miscounted its block boundaries (-inf or nan where it counted none)."""
    (tmp_path / "a.png").write_bytes(next(tiles_dir.glob("*.png")).read_bytes())
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((64, 64, 3), (128, 0, 255), np.uint8)).save(tmp_path / "violet.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (15, 40), np.uint8)).save(tmp_path / "strip.png")
    assert main(["--dataset", str(tmp_path), "--jpeg-only", "--qualities", "10", "--json", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "skipped black.png: flat (every pixel 0): no detail to restore" in err
    assert "skipped violet.png: flat (every pixel (128, 0, 255))" in err
    assert "skipped strip.png: too small (40x15, need at least 16 px per side)" in err
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["images"] == 1 and np.isfinite(results["results"]["10"]["jpeg"]["psnr"])


def test_a_test_set_in_other_formats_is_read_and_other_files_are_named(photo_pair, tmp_path):
    gray, rgb = photo_pair  # PGM/PPM as classic test sets ship them, an RGBA PNG that hides nothing
    Image.fromarray(gray).save(tmp_path / "a.pgm")
    Image.fromarray(rgb).save(tmp_path / "b.ppm")
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.ppm")  # a second "c": the first one stays
    (tmp_path / "notes.txt").write_text("where the images came from\n")
    (tmp_path / "more").mkdir()
    Image.fromarray(gray).save(tmp_path / "more" / "d.png")
    (tmp_path / "e.png").symlink_to(tmp_path / "moved" / "e.png")
    images, skipped = load_test_images(tmp_path)
    assert len(pickle.dumps(images)) < 2000  # the files, not their pixels: evaluate's workers read them as they go
    assert [images[n].color for n in "abc"] == [False, True, True]
    assert np.array_equal(images["a"].pixels(), gray) and np.array_equal(images["b"].pixels(), rgb)
    assert np.array_equal(images["c"].pixels(), rgb)
    assert skipped == [f"e.png: a link to {tmp_path / 'moved' / 'e.png'}, which does not exist", "more/: a subfolder (not searched)",
                       "notes.txt: not an image", "c.ppm: the set already has an image named c"]


def test_a_dataset_path_that_is_no_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"x")
    assert main(["--dataset", str(tmp_path / "gone"), "--jpeg-only"]) == 2
    assert capsys.readouterr().err.strip() == f"error: dataset folder {tmp_path / 'gone'} does not exist"
    assert main(["--dataset", str(tmp_path / "a.png"), "--jpeg-only"]) == 2
    assert capsys.readouterr().err.strip() == f"error: dataset {tmp_path / 'a.png'} is a file, not a folder of images"


def test_json_results_replace_earlier_results_but_never_a_file_that_is_not_json(photo_pair, tmp_path, capsys):
    """`--json notes.md` wrote the results over the notes."""
    (tmp_path / "set").mkdir()
    Image.fromarray(photo_pair[0][:64, :64]).save(tmp_path / "set" / "a.png")
    notes = tmp_path / "notes.md"
    notes.write_text("# what I tried\n")
    assert main(["--dataset", str(tmp_path / "set"), "--jpeg-only", "--qualities", "10", "--json", str(notes)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --json {notes} exists and is not JSON (results this would replace): "
                                               "choose another --json or move it away")
    assert notes.read_text() == "# what I tried\n"
    results = tmp_path / "results.json"
    for _ in range(2):  # the second run replaces the first one's results
        assert main(["--dataset", str(tmp_path / "set"), "--jpeg-only", "--qualities", "10", "--json", str(results)]) == 0
        assert json.loads(results.read_text())["images"] == 1


def test_originals_that_are_low_quality_jpegs_are_named(photo_pair, tmp_path, capfd):
    """A q20 JPEG as the original: at q20 and above its 'JPEG input' nearly repeats it (PSNR inf at
    its own quality), so the figures are flagged; a PNG and a q95 JPEG (as the BSDS originals) are not."""
    gray, _ = photo_pair
    Image.fromarray(gray).save(tmp_path / "a.png")
    Image.fromarray(gray).save(tmp_path / "b.jpg", quality=20)
    Image.fromarray(gray).save(tmp_path / "c.jpg", quality=95)
    out = tmp_path.parent / f"{tmp_path.name}.json"  # outside the test folder
    assert main(["--dataset", str(tmp_path), "--jpeg-only", "--qualities", "10,20", "--json", str(out)]) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["note: b.jpg is itself a JPEG of quality 20: its figures at q20 and above compare one JPEG with another"]
    assert json.loads(out.read_text())["per_image"]["20"]["b"]["jpeg"]["psnr"] == float("inf")
    assert main(["--dataset", str(tmp_path), "--jpeg-only", "--qualities", "10"]) == 0
    assert capfd.readouterr().err == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inf for the identical pair, without numpy's divide-by-zero warning
        assert psnr(gray, gray) == float("inf")
