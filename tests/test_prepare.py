import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline.images import jpeg_bytes
from data_pipeline.prepare import load_manifest, pool_size, prepare, split_of
from data_pipeline.sources import DataError


def _add_bad_files(folder, good):
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes(good.read_bytes()[:500])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "tiny.png")
    Image.fromarray(np.full((64, 64, 3), (255, 255, 255), np.uint8)).save(folder / "blank.png")  # a blank page


def test_prepare_writes_originals_jpegs_manifest_and_reports_bad_files(real_images, tmp_path):
    _add_bad_files(real_images, next(real_images.glob("*.png")))
    out = tmp_path / "prep"
    manifest = prepare(real_images, out, "gray", [10, 30], val_fraction=0.3, progress=False)
    report = json.loads((out / "report.json").read_text())
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"empty.png", "notes.txt", "truncated.png", "tiny.png", "blank.png"}
    assert "empty file" in reasons["empty.png"] and "too small" in reasons["tiny.png"]
    assert reasons["blank.png"].startswith("flat (every pixel 235): no detail to restore")  # its studio-range luma
    assert len(manifest["files"]) == 6 and manifest["qualities"] == [10, 30]
    for rec in manifest["files"]:
        src = np.asarray(Image.open(real_images / rec["source"]))
        assert np.array_equal(np.asarray(Image.open(out / rec["original"]["path"])), src)  # lossless
        jpeg = Image.open(out / rec["jpeg"]["10"]["path"])
        assert jpeg.format == "JPEG" and jpeg.size == (rec["width"], rec["height"])
        assert rec["split"] == split_of(rec["name"], 0.3)
    assert load_manifest(out) == json.loads((out / "manifest.json").read_text())
    assert not list(out.rglob("*.tmp"))


def test_rerun_skips_done_files_and_redoes_changed_ones(real_images, tmp_path):
    out = tmp_path / "prep"
    prepare(real_images, out, "gray", [10], progress=False)
    assert json.loads((out / "report.json").read_text())["written"] == 6
    prepare(real_images, out, "gray", [10], progress=False)
    assert json.loads((out / "report.json").read_text())["kept"] == 6
    changed = sorted(real_images.iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(changed))).save(changed)
    (out / "q10" / f"{sorted(real_images.iterdir())[1].stem}.jpg").unlink()  # as if interrupted
    prepare(real_images, out, "gray", [10], progress=False)
    report = json.loads((out / "report.json").read_text())
    assert (report["written"], report["kept"]) == (2, 4)
    prepare(real_images, out, "gray", [10, 20], progress=False)  # a new quality redoes all
    assert json.loads((out / "report.json").read_text())["written"] == 6
    # qualities add up: preparing q40 alone dropped q10 and q20 from the manifest, and a run trained on
    # them was told to prepare them again (which in turn dropped q40)
    manifest = prepare(real_images, out, "gray", [40], progress=False)
    assert manifest["qualities"] == [10, 20, 40] and all(sorted(r["jpeg"]) == ["10", "20", "40"] for r in manifest["files"])
    assert prepare(real_images, out, "gray", [20], progress=False)["qualities"] == [10, 20, 40]
    assert json.loads((out / "report.json").read_text())["kept"] == 6


def test_a_prepared_folder_keeps_its_source_and_mode(real_images, color_tiles_dir, tmp_path):
    out = tmp_path / "prep"
    manifest = prepare(real_images, out, "gray", [10], progress=False)
    for source, mode in ((real_images, "rgb"), (color_tiles_dir, "gray")):
        with pytest.raises(DataError, match=f"{out} holds {real_images} prepared in gray mode: prepare {source} "
                                            rf"\({mode}\) into another folder"):
            prepare(source, out, mode, [10], progress=False)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (out / "original").iterdir()) == sorted(f["original"]["path"][9:] for f in manifest["files"])


def test_a_copy_under_another_name_is_prepared_once(real_images, tmp_path):
    """The split goes by name, so a copy renamed (or saved in another format) could sit in training
    while the original validates: the first by name is prepared, the others are reported."""
    originals = sorted(p.name for p in real_images.iterdir())
    first = real_images / originals[0]
    (real_images / "zz_copy.png").write_bytes(first.read_bytes())
    Image.open(first).save(real_images / "zz_copy_as.bmp")
    manifest = prepare(real_images, tmp_path / "prep", "gray", [10], val_fraction=0.5, progress=False)
    assert [f["source"] for f in manifest["files"]] == originals
    reason = f"the same pixels as {first.name} (prepared once: copies could sit in both training and validation)"
    assert json.loads((tmp_path / "prep" / "report.json").read_text())["skipped"] == [
        {"file": "zz_copy.png", "reason": reason}, {"file": "zz_copy_as.bmp", "reason": reason}]


def test_tiles_cover_each_training_image_and_are_its_crops_compressed_alone(real_images, tmp_path):
    """--tile: a training image larger than the tile is stored as overlapping tiles, each the exact
    crop and its own JPEG (what the loaders decode for a patch); held-out images stay whole."""
    out = tmp_path / "prep"
    manifest = prepare(real_images, out, "gray", [10], val_fraction=0.3, progress=False, tile=64)
    assert manifest["tile_size"] == 64 and {f["split"] for f in manifest["files"]} == {"train", "val"}
    for rec in manifest["files"]:
        src = np.asarray(Image.open(real_images / rec["source"]))
        if rec["split"] == "val":
            assert "tiles" not in rec and np.array_equal(np.asarray(Image.open(out / rec["original"]["path"])), src)
            continue
        assert "original" not in rec and [(t["y"], t["x"]) for t in rec["tiles"]] == [
            (y, x) for y in (0, 32, 64, 96) for x in (0, 32, 64, 96)]  # 160 px: every 32, the last flush
        covered = np.zeros(src.shape, bool)
        for t in rec["tiles"]:
            crop = src[t["y"]:t["y"] + 64, t["x"]:t["x"] + 64]
            assert np.array_equal(np.asarray(Image.open(out / t["original"]["path"])), crop)
            assert (out / t["jpeg"]["10"]["path"]).read_bytes() == jpeg_bytes(crop, 10)
            covered[t["y"]:t["y"] + 64, t["x"]:t["x"] + 64] = True
        assert covered.all()
    prepare(real_images, out, "gray", [10, 20], val_fraction=0.3, progress=False, tile=64)  # a quality more
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 6 and (out / "q20").is_dir()
    prepare(real_images, out, "gray", [10, 20], val_fraction=0.3, progress=False, tile=64)
    assert json.loads((out / "report.json").read_text())["kept"] == 6
    (out / next(f for f in manifest["files"] if f["split"] == "train")["tiles"][5]["jpeg"]["10"]["path"]).unlink()
    prepare(real_images, out, "gray", [10, 20], val_fraction=0.3, progress=False, tile=64)  # a tile lost: its image redone
    assert json.loads((out / "report.json").read_text())["written"] == 1
    before = (out / "manifest.json").read_bytes()
    for tile, said in ((0, "in whole images"), (96, "in tiles of 96 px")):
        with pytest.raises(DataError, match=f"{out} holds {real_images} in tiles of 64 px: prepare it {said} into another folder"):
            prepare(real_images, out, "gray", [10], val_fraction=0.3, progress=False, tile=tile)
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(DataError, match="tiles must be at least 16 px"):
        prepare(real_images, tmp_path / "other", "gray", [10], progress=False, tile=8)


def test_a_copy_is_found_between_a_tiled_and_a_whole_image(real_images, tmp_path):
    """A copy under a name that is held out stays whole while its twin is tiled: found all the same."""
    names = [f"copy{i}" for i in range(40)]
    held_out = next(n for n in names if split_of(n, 0.5) == "val")
    trained = next(n for n in names if split_of(n, 0.5) == "train")
    first = sorted(real_images.iterdir())[0]
    for p in sorted(real_images.iterdir())[1:]:
        p.unlink()
    first.rename(real_images / f"{trained}.png")
    (real_images / f"{held_out}.png").write_bytes((real_images / f"{trained}.png").read_bytes())
    prepare(real_images, tmp_path / "prep", "gray", [10], val_fraction=0.5, progress=False, tile=64)
    skipped = json.loads((tmp_path / "prep" / "report.json").read_text())["skipped"]
    assert [s["file"] for s in skipped] == [f"{max(held_out, trained)}.png"]


def test_a_few_large_photos_are_prepared_by_several_workers(tmp_path):
    """Workers went by image count alone (one per 200): 24 photos of 2040x1356 took one worker, 21 s."""
    small = [tmp_path / f"s{i}.png" for i in range(300)]
    for f in small:
        f.write_bytes(b"x" * 20_000)
    large = [tmp_path / f"l{i}.png" for i in range(3)]
    for f in large:
        with open(f, "wb") as fh:
            fh.truncate(12 * 2**20)
    assert pool_size(small[:150], 16) == 1 and pool_size(small, 16) == 2  # 6 MB: by count
    assert pool_size(large, 16) == 3 and pool_size(large, 2) == 2  # 36 MB: by size, at most the cap


def test_split_is_deterministic_and_roughly_proportional():
    names = [f"img{i}" for i in range(2000)]
    val = [n for n in names if split_of(n, 0.1) == "val"]
    assert val == [n for n in names if split_of(n, 0.1) == "val"]
    assert 150 < len(val) < 250


def test_rgb_mode_skips_gray_sources(real_images, color_tiles_dir, tmp_path):
    color = tmp_path / "color"
    color.mkdir()
    for p in sorted(color_tiles_dir.iterdir())[:2]:
        (color / p.name).write_bytes(p.read_bytes())
    (color / "gray.png").write_bytes(next(real_images.glob("*.png")).read_bytes())
    manifest = prepare(color, tmp_path / "prep", "rgb", [10], progress=False)
    assert len(manifest["files"]) == 2
    assert np.asarray(Image.open(tmp_path / "prep" / manifest["files"][0]["jpeg"]["10"]["path"])).shape[2] == 3
    skipped = json.loads((tmp_path / "prep" / "report.json").read_text())["skipped"]
    assert skipped == [{"file": "gray.png", "reason": "grayscale image, but the dataset mode is rgb"}]


def test_empty_or_missing_source_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="no usable images"):
        prepare(tmp_path / "junk", tmp_path / "out", progress=False)


def test_subfolders_of_a_source_are_reported_not_passed_over_silently(real_images, tmp_path):
    (real_images / "more").mkdir()
    shutil.move(str(sorted(real_images.glob("*.png"))[0]), real_images / "more")
    out = real_images / "prepared"  # an output folder inside the source is not reported
    manifest = prepare(real_images, out, "gray", [10], progress=False)
    assert len(manifest["files"]) == 5
    assert json.loads((out / "report.json").read_text())["skipped"] == [
        {"file": "more/", "reason": "a subfolder (not searched: prepare it as a source of its own)"}]
    only_folders = tmp_path / "by-year"
    (only_folders / "2019").mkdir(parents=True)
    (only_folders / "2020").mkdir()
    with pytest.raises(DataError, match=r"holds no images \(its subfolders 2019/, 2020/ are not searched: name one"):
        prepare(only_folders, tmp_path / "out", progress=False)


def test_links_to_nothing_and_pipes_in_a_source_are_reported_not_dropped_or_waited_on(real_images, tmp_path):
    """A dataset of links whose targets moved loses images: each is named (a pipe is never opened:
    reading it would wait forever)."""
    (real_images / "moved.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(real_images / "stream.png")
    manifest = prepare(real_images, tmp_path / "out", "gray", [10], progress=False)
    assert len(manifest["files"]) == 6
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"] == [
        {"file": "moved.png", "reason": f"a link to {tmp_path / 'gone.png'}, which does not exist"},
        {"file": "stream.png", "reason": "not a regular file (a pipe, socket or device)"}]


def test_a_folder_with_a_manifest_of_its_own_is_not_prepared_into(real_images, tmp_path):
    """`--out` naming a web app's folder replaced its manifest.json."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my app", "icons": []}')
    with pytest.raises(DataError, match=re.escape(f"{app / 'manifest.json'} was not written by preparation: prepare into another folder")):
        prepare(real_images, app, "gray", [10], progress=False)
    assert (app / "manifest.json").read_text() == '{"name": "my app", "icons": []}' and sorted(os.listdir(app)) == ["manifest.json"]
    (app / "manifest.json").write_text('{"files": [')  # a damaged manifest of a preparation: prepared again
    assert len(prepare(real_images, app, "gray", [10], progress=False)["files"]) == 6


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "data_pipeline.prepare", *args], capture_output=True, text=True, env=env)


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("JPEG_RESTORE_DATA_ROOT", raising=False)
    r = _cli("train400", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip() == "error: no data root: pass --data-root DIR or set JPEG_RESTORE_DATA_ROOT"
    r = _cli("nope", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "dataset 'nope' not found" in r.stderr
    r = _cli(str(tmp_path), "--out", str(tmp_path / "o"), "--qualities", "0")
    assert r.returncode == 2 and "qualities must be in 1..100" in r.stderr
    for option in (["--workers", "-2"], ["--workers", "0"], ["--min-size", "-1"]):  # -2 was a ValueError traceback
        r = _cli(str(tmp_path), "--out", str(tmp_path / "o"), *option)
        assert r.returncode == 2 and r.stderr.startswith("error: --min-size and --workers must be at least 1"), r.stderr


def _bmp_bytes(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="BMP")
    return buf.getvalue()


def test_cli_into_a_log_prints_its_summary_without_a_progress_bar(real_images, tmp_path):
    """A bar's redraws run together in a pipe or a file (a Slurm log): only on a terminal."""
    r = _cli(str(real_images), "--out", str(tmp_path / "o"), "--qualities", "10", "--workers", "1")
    assert r.returncode == 0 and r.stdout.startswith("prepared 6 images into") and r.stderr == "", r.stderr


def test_official_archives_extract_only_the_needed_images(photos, color_tiles_dir, tmp_path):
    rgb = [photos["astronaut"], photos["coffee"]]
    live = tmp_path / "databaserelease2.zip"
    with zipfile.ZipFile(live, "w") as z:
        z.writestr("databaserelease2/refimgs/bikes.bmp", _bmp_bytes(rgb[0]))
        z.writestr("databaserelease2/refimgs/building2.bmp", _bmp_bytes(rgb[1]))
        z.writestr("databaserelease2/jpeg/img1.bmp", _bmp_bytes(rgb[0]))  # distorted: not wanted
        z.writestr("databaserelease2/readme.txt", "LIVE")
    m = prepare(live, tmp_path / "live", "rgb", [10], progress=False)
    assert [f["name"] for f in m["files"]] == ["bikes", "building2"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "live" / m["files"][0]["original"]["path"])), rgb[0])

    bsds = tmp_path / "BSR_bsds500.tgz"
    with tarfile.open(bsds, "w:gz") as t:
        for i, p in enumerate(sorted(color_tiles_dir.iterdir())[:4]):
            jpg = tmp_path / f"{p.stem}.jpg"  # BSDS ships JPEGs
            Image.open(p).save(jpg, quality=95)
            split = ["train", "test", "val"][i] if i < 3 else None
            t.add(jpg, f"BSR/BSDS500/data/images/{split}/{jpg.name}" if split else "BSR/BSDS500/data/groundTruth/train/x.jpg")
    m = prepare(bsds, tmp_path / "bsds", "gray", [10], progress=False)
    assert len(m["files"]) == 3

    div2k = tmp_path / "DIV2K_train_HR.zip"  # a folder of PNGs; Flickr2K.tar holds its LR versions beside them
    flickr = tmp_path / "Flickr2K.tar"
    with zipfile.ZipFile(div2k, "w") as z, tarfile.open(flickr, "w") as t:
        for i, p in enumerate(sorted(color_tiles_dir.iterdir())[:3]):
            z.write(p, f"DIV2K_train_HR/{i + 1:04d}.png")
            t.add(p, f"Flickr2K/Flickr2K_HR/{i + 1:06d}.png")
            t.add(p, f"Flickr2K/Flickr2K_LR_bicubic/X2/{i + 1:06d}x2.png")
    assert [f["name"] for f in prepare(div2k, tmp_path / "div2k", "rgb", [10], progress=False)["files"]] == ["0001", "0002", "0003"]
    assert [f["name"] for f in prepare(flickr, tmp_path / "flickr", "rgb", [10], progress=False)["files"]] == [
        "000001", "000002", "000003"]

    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("pics/a.bmp", _bmp_bytes(rgb[0]))
    with pytest.raises(DataError, match=r"not a known archive \(expected LIVE release-2 zip, BSR_bsds500.tgz, "
                                        r"DIV2K_\{train,valid\}_HR.zip or Flickr2K.tar\); extract it and prepare its folder"):
        prepare(other, tmp_path / "o", progress=False)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="unreadable archive"):
        prepare(tmp_path / "broken.zip", tmp_path / "o", progress=False)


def test_quality_ranges_for_blind_training():
    from data_pipeline.prepare import parse_qualities

    assert parse_qualities("5-95:5") == list(range(5, 96, 5)) and parse_qualities("10,40") == [10, 40]
    with pytest.raises(DataError, match="range like 5-95:5"):
        parse_qualities("ten")
    for backwards in ("40-10", "5-95:-5", "5-95:0"):  # said to be outside 1..100, or a traceback, before
        with pytest.raises(DataError, match="range goes from low to high by a step of at least 1"):
            parse_qualities(backwards)
