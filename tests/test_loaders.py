import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.config import DataConfig
from data_pipeline.images import rgb_to_luma
from data_pipeline.loaders import build_loader, dali_available, resolve_backend, training_pairs
from data_pipeline.prepare import load_manifest, prepare
from data_pipeline.sources import DataError
from data_pipeline.system import usable_cpus

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def _psnr(x, y):
    """Per-patch PSNR, capped at 100 dB (a flat patch can come back exactly)."""
    return (10 * torch.log10(1 / ((x - y) ** 2).flatten(1).mean(1))).clamp(max=100)


def _mean_psnr(batches) -> float:
    """PSNR of the mean squared error over all patches (robust to exact patches)."""
    mse = torch.cat([((x - y) ** 2).flatten(1).mean(1) for x, y in batches]).mean()
    return float(10 * torch.log10(1 / mse))


def _epoch(cfg, rank=0, world=1, epoch=0):
    loader = build_loader(cfg, rank, world)
    loader.set_epoch(epoch)
    return list(loader)


@needs_dali
def test_dali_and_torch_give_the_same_kind_of_pairs(tiles_prepared):
    """Centre crops of the same files: same shapes, ranges and JPEG-vs-original PSNR."""
    stats = {}
    for backend in ("dali", "torch"):
        cfg = DataConfig(backend=backend, prepared_dir=str(tiles_prepared), augment=False, qualities=[10], batch_size=8)
        batches = _epoch(cfg)
        x, y = batches[0]
        assert x.shape == y.shape == (8, 1, 64, 64) and x.dtype == y.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1
        stats[backend] = (len(batches), _mean_psnr(batches))
    print(f"mean JPEG PSNR over {stats['torch'][0]} batches: dali {stats['dali'][1]:.3f} dB, torch {stats['torch'][1]:.3f} dB")
    assert stats["dali"][0] == stats["torch"][0]
    assert abs(stats["dali"][1] - stats["torch"][1]) < 0.1


@pytest.mark.parametrize("backend", ["torch", "resident", pytest.param("dali", marks=needs_dali)])
def test_augmented_pairs_stay_aligned(tiles_prepared, backend):
    """Input and target get the same crop and flips: a misaligned pair would be far below 20 dB."""
    cfg = DataConfig(backend=backend, prepared_dir=str(tiles_prepared), qualities=[10, 40], batch_size=16)
    x, y = next(iter(build_loader(cfg)))
    assert _psnr(x, y).min() > 20
    mis = _psnr(x, torch.flip(y, dims=[3]))
    assert mis.mean() < _psnr(x, y).mean() - 5


@needs_dali
@pytest.mark.parametrize("quality", [10, 30])
def test_online_mode_psnr_is_close_to_pillow(tiles_prepared, quality):
    cfg = dict(prepared_dir=str(tiles_prepared), augment=False, online=True,
               online_quality_range=[quality, quality], batch_size=8)
    psnr = {b: _mean_psnr(_epoch(DataConfig(backend=b, **cfg))) for b in ("dali", "torch")}
    print(f"online q{quality}: DALI {psnr['dali']:.3f} dB, Pillow {psnr['torch']:.3f} dB, diff {psnr['dali'] - psnr['torch']:+.3f}")
    assert abs(psnr["dali"] - psnr["torch"]) < 0.5


def test_online_quality_range_changes_the_inputs(tiles_prepared):
    cfg = dict(backend="torch", prepared_dir=str(tiles_prepared), augment=False, online=True, batch_size=8)
    low = _mean_psnr(_epoch(DataConfig(online_quality_range=[10, 10], **cfg)))
    high = _mean_psnr(_epoch(DataConfig(online_quality_range=[60, 60], **cfg)))
    assert high > low + 3


@pytest.mark.parametrize("backend", ["torch", "resident", pytest.param("dali", marks=needs_dali)])
def test_ranks_get_equal_steps_and_different_shards(tiles_prepared, backend):
    cfg = DataConfig(backend=backend, prepared_dir=str(tiles_prepared), qualities=[10], batch_size=16, augment=False)
    r0, r1 = _epoch(cfg, 0, 2), _epoch(cfg, 1, 2)
    n_train = sum(f["split"] == "train" for f in load_manifest(tiles_prepared)["files"])
    assert len(r0) == len(r1) == (n_train // 2) // 16 > 1
    assert not torch.equal(r0[0][1], r1[0][1])
    if backend != "dali":
        seen0 = {t.numpy().tobytes() for b in r0 for t in b[1]}
        seen1 = {t.numpy().tobytes() for b in r1 for t in b[1]}
        assert not seen0 & seen1


def test_torch_epochs_are_reproducible_and_reshuffled(tiles_prepared):
    cfg = DataConfig(backend="torch", prepared_dir=str(tiles_prepared), qualities=[10], batch_size=8)
    a, b, c = _epoch(cfg, epoch=3)[0], _epoch(cfg, epoch=3)[0], _epoch(cfg, epoch=4)[0]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_validation_split_is_held_out(tiles_prepared):
    cfg = DataConfig(backend="torch", prepared_dir=str(tiles_prepared), qualities=[10], batch_size=8, augment=False)
    train = {t.numpy().tobytes() for _, y in _epoch(cfg) for t in y}
    val = [t.numpy().tobytes() for _, y in list(build_loader(cfg, split="val")) for t in y]
    assert val and not train & set(val)


def test_synthetic_backend():
    cfg = DataConfig(backend="synthetic", mode="rgb", batch_size=4, patch_size=32)
    x, y = next(iter(build_loader(cfg)))
    assert x.shape == y.shape == (4, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_loader_errors_are_clear(tiles_prepared, tmp_path):
    with pytest.raises(DataError, match=r"every training image is smaller than data.patch_size 256 \(the largest has 160 px on its shorter side\)"):
        build_loader(DataConfig(backend="torch", prepared_dir=str(tiles_prepared), patch_size=256))
    with pytest.raises(DataError, match=r"no JPEGs at qualities \[20\]"):
        build_loader(DataConfig(backend="torch", prepared_dir=str(tiles_prepared), qualities=[20]))
    with pytest.raises(DataError, match="no manifest.json"):
        build_loader(DataConfig(backend="torch", prepared_dir=str(tmp_path)))
    with pytest.raises(DataError, match="prepared in gray mode"):
        build_loader(DataConfig(backend="torch", prepared_dir=str(tiles_prepared), mode="rgb"))
    with pytest.raises(DataError, match="too few for batch 512 x 1 ranks"):
        build_loader(DataConfig(backend="torch", prepared_dir=str(tiles_prepared), batch_size=512, qualities=[10]))
    with pytest.raises(ValueError, match="data.backend must be one of"):
        DataConfig(backend="tf")
    everything_held_out = tmp_path / "all_val"  # was told to raise data.val_fraction
    prepare(sorted(tiles_prepared.glob("original"))[0], everything_held_out, "gray", [10], val_fraction=0.999999, progress=False)
    with pytest.raises(DataError, match=r"the 'train' split is empty \(lower data.val_fraction or add images\)"):
        build_loader(DataConfig(backend="torch", prepared_dir=str(everything_held_out), qualities=[10]))


def test_training_images_smaller_than_a_patch_are_passed_over_and_named(tiles_dir, tmp_path, caplog):
    """One 50x70 photo among a user's images stopped the whole training ("smallest image side 50 <
    data.patch_size 64"), naming no file, and only when the hash split put it in training."""
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(tiles_dir.glob("*.png"))[:8]:
        (src / p.name).write_bytes(p.read_bytes())
    small = np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8)
    Image.fromarray(small).save(src / "small.png")
    prepare(src, tmp_path / "prep", "gray", [10], val_fraction=0.0, progress=False)
    with caplog.at_level("WARNING", logger="data_pipeline.loaders"):
        pairs = training_pairs(DataConfig(prepared_dir=str(tmp_path / "prep"), qualities=[10], patch_size=64))
    assert len(pairs) == 8 and "small.png" not in {Path(target).name for _, target, _ in pairs}
    assert "passed over 1 training image(s) smaller than data.patch_size 64: small.png (70x50)" in caplog.text


@pytest.mark.parametrize("backend", ["torch", "resident", pytest.param("dali", marks=needs_dali)])
def test_a_tiled_preparation_gives_a_pair_per_tile(real_images, tmp_path, backend):
    """Prepared in tiles (prepare --tile), each tile is a pair: the loaders crop their patches from
    a tile's files, which hold that part of the image and its JPEG."""
    manifest = prepare(real_images, tmp_path / "prep", "gray", [10], val_fraction=0.0, progress=False, tile=96)
    cfg = DataConfig(backend=backend, prepared_dir=str(tmp_path / "prep"), qualities=[10], batch_size=6, augment=False)
    assert len(training_pairs(cfg)) == 6 * 9  # 160 px: tiles at 0, 48, 64 a side
    batches = _epoch(cfg)
    assert len(batches) == 9
    targets, inputs = torch.cat([y for _, y in batches]), torch.cat([x for x, _ in batches])
    tiles = [(rec, t) for rec in manifest["files"] for t in rec["tiles"]][:len(targets)]
    for (rec, t), target, inp in zip(tiles, targets, inputs):  # centre crops: 16 px into each 96 px tile
        src = np.asarray(Image.open(real_images / rec["source"]))
        y, x = t["y"] + 16, t["x"] + 16
        assert np.array_equal((target[0] * 255).round().byte().numpy(), src[y:y + 64, x:x + 64])
        jpeg = np.asarray(Image.open(tmp_path / "prep" / t["jpeg"]["10"]["path"]))[16:80, 16:80]
        assert np.array_equal((inp[0] * 255).round().byte().numpy(), jpeg)


def test_a_loader_decoding_whole_photos_of_megapixels_says_tiles_would_not(photos, tmp_path, caplog):
    """The torch and DALI loaders decode a file per patch: on photos of megapixels they starve a GPU
    unless prepared in tiles, which the log says; not for tiles, nor for the resident backend."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("astronaut", "coffee"):  # each photo tiled 3 x 3: over 2 MP
        img = rgb_to_luma(photos[name]) if photos[name].ndim == 3 else photos[name]
        Image.fromarray(np.tile(img, (3, 3))).save(src / f"{name}.png")
    said = {}
    for tile, backend in ((0, "torch"), (0, "resident"), (480, "torch")):
        prepared = tmp_path / f"prep{tile}"
        prepare(src, prepared, "gray", [10], val_fraction=0.0, progress=False, tile=tile)
        caplog.clear()
        with caplog.at_level("WARNING", logger="data_pipeline.loaders"):
            build_loader(DataConfig(backend=backend, prepared_dir=str(prepared), qualities=[10], batch_size=2, workers=0))
        said[tile, backend] = [r.getMessage() for r in caplog.records if "decodes a whole file" in r.getMessage()]
    assert said[0, "resident"] == said[480, "torch"] == []
    assert len(said[0, "torch"]) == 1 and re.fullmatch(
        r"the torch loader decodes a whole file for every patch, and these average \d\.\d MP: prepared in tiles "
        r"\(data.tile_size = 480\) it decodes a tile instead, 12x the patches/s on 2040x1356 photos", said[0, "torch"][0])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # torch's advice on the workers at the cap, wanted here
def test_more_loader_workers_than_the_cpus_can_run_is_one_line(tiles_prepared):
    """data.workers=100000 started worker after worker for ten minutes, deaf to SIGTERM."""
    cap = 4 * usable_cpus()
    with pytest.raises(DataError, match=re.escape(f"data.workers 100000 is more than {cap}, 4 for each of the {usable_cpus()} CPUs")):
        build_loader(DataConfig(backend="torch", prepared_dir=str(tiles_prepared), qualities=[10, 40], workers=100000))
    assert build_loader(DataConfig(backend="torch", prepared_dir=str(tiles_prepared), qualities=[10, 40], workers=cap)).backend == "torch"


def test_resident_equals_torch_on_centre_crops(tiles_prepared):
    """Without augmentation both backends take the pairs in order and the same centre crops: same bytes."""
    cfg = dict(prepared_dir=str(tiles_prepared), qualities=[10, 40], batch_size=8, augment=False)
    torch_batches, resident = _epoch(DataConfig(backend="torch", **cfg)), _epoch(DataConfig(backend="resident", **cfg))
    assert len(torch_batches) == len(resident) > 3
    for (a, b), (c, d) in zip(torch_batches, resident):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_resident_resumes_exactly_and_reshuffles_per_epoch(tiles_prepared):
    cfg = DataConfig(backend="resident", prepared_dir=str(tiles_prepared), qualities=[10, 40], batch_size=8)
    whole = _epoch(cfg, epoch=2)
    loader = build_loader(cfg)
    loader.set_epoch(2, start=3)
    resumed = list(loader)
    assert len(resumed) == len(whole) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, whole[3:]))
    assert not torch.equal(_epoch(cfg, epoch=3)[0][1], whole[0][1])


def test_resident_memory_budget_and_online_mode_are_clear(tiles_prepared):
    with pytest.raises(DataError, match=r"needs \d+ MiB for \d+ images x 3 versions .* data.resident_mb is 0"):
        build_loader(DataConfig(backend="resident", prepared_dir=str(tiles_prepared), qualities=[10, 40], resident_mb=0))
    with pytest.raises(DataError, match="needs prepared JPEGs"):
        build_loader(DataConfig(backend="resident", prepared_dir=str(tiles_prepared), online=True))


@pytest.mark.parametrize("backend", ["torch", "resident", pytest.param("dali", marks=needs_dali)])
def test_quality_plane_carries_each_samples_quality_or_zero(tiles_prepared, backend):
    cfg = dict(backend=backend, prepared_dir=str(tiles_prepared), qualities=[10, 40], batch_size=8, augment=False, workers=0)
    plain = _epoch(DataConfig(**cfg))
    planed = _epoch(DataConfig(quality_plane=True, blind_fraction=0.5, **cfg))
    values = []
    for (x, y), (xq, yq) in zip(plain, planed):
        assert xq.shape == (8, 2, 64, 64) and torch.equal(xq[:, :1], x) and torch.equal(yq, y)  # the image itself unchanged
        plane = (xq[:, 1] * 255).round()
        assert torch.equal(plane, plane[:, :1, :1].expand_as(plane))  # constant per sample
        values += plane[:, 0, 0].int().tolist()
    assert set(values) <= {0, 10, 40} and {10, 40} <= set(values)
    assert 0.25 < values.count(0) / len(values) < 0.75  # blind_fraction 0.5
    # pairs come in (image, quality) order without shuffling: a non-blind plane names that pair's quality
    assert all(v in (0, q) for v, q in zip(values, [10, 40] * len(values)))


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_online_mode_planes_name_the_drawn_quality(tiles_prepared, backend):
    cfg = DataConfig(backend=backend, prepared_dir=str(tiles_prepared), augment=False, online=True, online_quality_range=[20, 20],
                     quality_plane=True, blind_fraction=0.0, batch_size=8, workers=0)
    x, _ = _epoch(cfg)[0]
    assert x.shape[1] == 2 and set((x[:, 1] * 255).round().int().unique().tolist()) == {20}


def test_auto_takes_resident_when_the_prepared_data_fits(tiles_prepared):
    cfg = dict(backend="auto", prepared_dir=str(tiles_prepared), qualities=[10], batch_size=8)
    assert build_loader(DataConfig(**cfg)).backend == "resident"
    fallback = "dali" if dali_available() else "torch"
    assert build_loader(DataConfig(resident_mb=0, **cfg)).backend == fallback
    assert build_loader(DataConfig(online=True, **cfg)).backend == fallback
    # nvJPEG's RGB decode differs from libjpeg's: auto never takes DALI for RGB
    pairs = training_pairs(DataConfig(**cfg))
    assert resolve_backend("auto", pairs, DataConfig(resident_mb=0, mode="rgb", **cfg)) == "torch"


def test_loader_benchmark_measures_every_available_backend(tiles_prepared):
    from data_pipeline import benchmark

    rows = benchmark.measure(tiles_prepared, 3, torch.device("cpu"), shapes=((8, 32),), workers=2, qualities=[10, 40], repeats=3)
    expected = {("resident", 0), ("torch", 1), ("torch", 2), ("synthetic", 0)} | ({("dali", 2)} if dali_available() else set())
    assert {(r["backend"], r["workers"]) for r in rows} == expected
    assert all(r["patches_per_s"] > 0 and (r["batch"], r["patch"], r["mode"]) == (8, 32, "gray") for r in rows)
    # the median of three measurements and their range: one figure on a shared machine moves 2x between runs
    assert all(r["patches_per_s_range"][0] <= r["patches_per_s"] <= r["patches_per_s_range"][1] for r in rows)
    assert any(r["patches_per_s_range"][0] < r["patches_per_s_range"][1] for r in rows)


def test_loader_benchmark_measures_only_the_backends_asked_for(tiles_prepared):
    from data_pipeline import benchmark

    rows = benchmark.measure(tiles_prepared, 2, torch.device("cpu"), shapes=((8, 32),), workers=2, qualities=[10], only=["resident"])
    assert [(r["backend"], r["workers"]) for r in rows] == [("resident", 0)]
    with pytest.raises(ValueError, match="unknown loader backend.*nvjpeg"):
        benchmark.variants(2, ["resident", "nvjpeg"])


def test_loader_benchmark_measures_a_dataset_of_ones_own_in_tiles(real_images, tmp_path, monkeypatch, capsys):
    """--dataset, --tile, --cache-mb: the benchmark that shows whether a set of large photos starves the GPU."""
    from data_pipeline import benchmark

    monkeypatch.chdir(tmp_path)
    args = ["--dataset", str(real_images), "--backends", "torch", "--workers", "1", "--batches", "1", "--cache-mb", "0"]
    assert benchmark.main([*args, "--tile", "128", "--json", "tiles.json"]) == 0
    report = json.loads((tmp_path / "tiles.json").read_text())
    assert report["prepared"] == {"gray": str(Path("outputs/prepared") / f"{real_images.name}-gray-tile128")}
    assert (report["tile"], report["cache_mb"]) == (128, 0) and len(report["rows"]) == 2
    manifest = load_manifest(tmp_path / report["prepared"]["gray"])
    pairs = sum(len(f["tiles"]) for f in manifest["files"] if f["split"] == "train") * 4  # q10-40
    assert manifest["tile_size"] == 128 and [r["steps_per_epoch"] for r in report["rows"]] == [pairs // 32, pairs // 64]
    out = capsys.readouterr().out
    assert f"{real_images.name}-gray-tile128, torch workers' cache 0 MiB" in out and "fewer batches than workers" not in out
    assert out.splitlines()[1].endswith("patches/s          range of 3") and (report["batches"], report["repeats"]) == (1, 3)
    assert all(r["patches_per_s_range"][0] <= r["patches_per_s"] <= r["patches_per_s_range"][1] for r in report["rows"])
    assert pairs // 64 < 2 and benchmark.main([*args[:5], "2", *args[6:], "--tile", "128", "--json", "two.json"]) == 0
    assert "\n* an epoch has fewer batches than workers: the torch loader keeps only that many busy\nwrote two.json\n" in \
        capsys.readouterr().out
    assert benchmark.main([*args, "--modes", "gray,rgb"]) == 2
    assert benchmark.main([*args, "--tile", "96"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        "error: --dataset is prepared in one mode: give --modes gray or --modes rgb, got 'gray,rgb'",
        "error: --cache-mb must be 0 or more and --tile 0 or at least the largest patch, 128, got 0 and 96"]


@needs_dali
@pytest.mark.parametrize("mode", ["gray", "rgb"])
def test_dali_cpu_decodes_and_distorts_like_pillow(photo_pair, mode):
    """On the CPU DALI uses libjpeg-turbo: its decode and its jpeg_compression_distortion match Pillow's
    bytes (on the GPU the same check measures nvJPEG's shift, data_pipeline.decoder_check)."""
    from data_pipeline.decoder_check import check, report

    image = photo_pair[0 if mode == "gray" else 1]
    originals = [np.ascontiguousarray(image[:96, :128]), np.ascontiguousarray(image[200:320, 100:260])]
    result = check(originals, [10], "cpu", mode)
    print(report(result))
    row = result["qualities"][10]
    assert row["pillow_psnr"] < 40 and row["decode_shift_db"] == 0 and row["decode_max_abs_diff"] == 0
    assert row["distortion_max_abs_diff"] == 0 and result["png_decode_ms"] > 0


def _small_loader(real_images, tmp_path, backend: str, workers: int):
    """The six photographs prepared at q10 (nothing held out) and a loader of 32-px patches, batch 2."""
    prepared = tmp_path / "prep"
    prepare(real_images, prepared, "gray", [10], val_fraction=0.0, progress=False)
    return prepared, build_loader(DataConfig(prepared_dir=str(prepared), qualities=[10], patch_size=32, batch_size=2,
                                             backend=backend, workers=workers, cache_mb=0))


@needs_dali
def test_dali_reads_the_data_files_without_mapping_them(real_images, tmp_path):
    """DALI's file reader mapped the files it read ahead: one cut short under a mapping killed the
    process with SIGBUS (the damaged-file test below crashed its pytest worker so, once in many
    runs) instead of the error that names it."""
    prepared, loader = _small_loader(real_images, tmp_path, "dali", 0)
    next(iter(loader))
    assert [line for line in Path("/proc/self/maps").read_text().splitlines() if str(prepared) in line] == []
    del loader
    gc.collect()


@pytest.mark.parametrize("backend, workers", [("torch", 0), ("torch", 2), pytest.param("dali", 0, marks=needs_dali)])
def test_a_file_damaged_during_training_is_named(real_images, tmp_path, backend, workers):
    """The files are checked before the first step; one cut short after that (the backends read them
    again each epoch) failed with the backend's decode traceback. It is named as before training."""
    prepared, loader = _small_loader(real_images, tmp_path, backend, workers)
    assert len(list(loader)) == 3  # six images, batch 2
    sizes = {}
    for f in load_manifest(prepared)["files"]:  # every JPEG cut short: DALI has read ahead into the next epoch
        path = prepared / f["jpeg"]["10"]["path"]
        sizes[f["jpeg"]["10"]["path"]] = size = path.stat().st_size
        path.write_bytes(path.read_bytes()[:size // 3])
    with pytest.raises(DataError) as exc:
        for epoch in (1, 2):
            loader.set_epoch(epoch)
            list(loader)
    first, size = next(iter(sizes.items()))
    assert str(exc.value).startswith(f"{prepared}: 6 prepared file(s) missing or changed since preparation "
                                     f"({first} has {size // 3} bytes, not {size}, ...): prepare it again"), exc.value
    assert str(exc.value).endswith("; then --resume continues the run")
    loader.close()  # the torch workers: left to the garbage collector, they took 10 s to end
    del loader, exc  # DALI's pipeline shut down here: its threads' "[jpeg_parser] Invalid marker" lines stay in this test
    gc.collect()


AFTER_DALI = '''
import sys
from pathlib import Path
from pathlib import Path

import data_pipeline.prepare
from data_pipeline.config import DataConfig
from data_pipeline.loaders import build_loader
from data_pipeline.prepare import prepare


def main(source, out):
    data_pipeline.prepare.IMAGES_PER_WORKER = 1  # a pool of workers even for a few images
    prepare(source, out / "first", "gray", [10], val_fraction=0.0, progress=False)
    loader = build_loader(DataConfig(prepared_dir=str(out / "first"), qualities=[10], patch_size=32, batch_size=2,
                                     backend="dali", workers=1))
    list(loader)
    cycle = [loader]
    cycle.append(cycle)
    del loader, cycle  # garbage the collector has not met yet (a test's traceback left one so)
    prepare(source, out / "second", "gray", [10], progress=False)
    print("prepared after DALI")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
'''


@needs_dali
def test_a_preparation_after_a_dali_loader_finishes(real_images, tmp_path):
    """Preparation forked its workers, and a worker whose garbage collector met the copy of a DALI
    pipeline the parent had left as garbage waited for ever in its destructor: the test session hung
    in the preparation after the damaged-file test. Spawned workers copy nothing of the parent."""
    (tmp_path / "after_dali.py").write_text(AFTER_DALI)
    proc = subprocess.run([sys.executable, str(tmp_path / "after_dali.py"), str(real_images), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "prepared after DALI\n", proc.stderr[-2000:]
