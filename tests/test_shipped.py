"""The shipped models (repository root): loadable weights-only, used by default by the evaluation
and restore commands, and better than JPEG on real LIVE1 images."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.errors import UserError
from data_pipeline.images import is_gray, jpeg_roundtrip, read_image, rgb_to_luma
from runtime.figures import label_height
from runtime.inference import SHIPPED_COLOR, SHIPPED_GRAY, Restorer, shipped_model
from runtime.metrics.psnr import psnr

REPO = SHIPPED_GRAY.parent


def test_shipped_gray_model_is_a_weights_only_deep_cnn():
    state = torch.load(SHIPPED_GRAY, map_location="cpu", weights_only=True)
    assert state["arch"] in {"dncnn", "unet", "attention"} and state["mode"] == "gray"
    assert isinstance(state["kwargs"], dict) and state["metrics"]["val_psnr"] > 30.0
    assert not any(k in state for k in ("optimizer", "scheduler", "rng"))  # weights, not a training state


@pytest.mark.slow
def test_evaluate_uses_the_shipped_model_by_default(data_root, tmp_path):
    for name in ("bikes", "monarch", "parrots"):
        shutil.copy(data_root / "live1_gray" / f"{name}.png", tmp_path / f"{name}.png")
    from train.evaluate import main as evaluate

    out = tmp_path / "res.json"
    assert evaluate(["--dataset", str(tmp_path), "--qualities", "10,40", "--json", str(out)]) == 0  # the ends of the range
    res = json.loads(out.read_text())
    assert res["checkpoint"] == str(SHIPPED_GRAY)
    for q, r_q in res["results"].items():
        assert r_q["model"]["psnr"] > r_q["jpeg"]["psnr"] + 0.8, q
        assert r_q["model"]["psnrb"] > r_q["jpeg"]["psnrb"] + 0.8, q


def test_gray_model_restores_the_luma_of_color_images(photos):
    original = photos["motorcycle_left"]  # a real color photograph (scikit-image)
    jpeg = jpeg_roundtrip(original, 10)
    restored = Restorer(SHIPPED_GRAY)(jpeg)
    assert restored.shape == original.shape and restored.dtype == np.uint8
    assert psnr(original, restored) > psnr(original, jpeg) + 0.3
    ycc_jpeg, ycc_out = (np.asarray(Image.fromarray(a).convert("YCbCr")).astype(int) for a in (jpeg, restored))
    chroma_change = np.abs(ycc_out[..., 1:] - ycc_jpeg[..., 1:])
    assert np.percentile(chroma_change, 99) <= 1  # chroma kept (up to the RGB round trip and gamut clipping)
    assert np.abs(ycc_out[..., 0] - ycc_jpeg[..., 0]).mean() > 1  # luma restored


def test_shipped_color_model_beats_jpeg_and_the_gray_model_on_luma(data_root):
    assert shipped_model(color=True) == SHIPPED_COLOR and shipped_model(color=False) == SHIPPED_GRAY
    original = read_image(data_root / "live1_color" / "monarch.png", "rgb")
    jpeg = jpeg_roundtrip(original, 10)
    color = Restorer(SHIPPED_COLOR)
    assert color.mode == "rgb"
    rgb_psnr, luma_psnr = psnr(original, color(jpeg)), psnr(original, Restorer(SHIPPED_GRAY)(jpeg))
    assert rgb_psnr > psnr(original, jpeg) + 0.5 and rgb_psnr > luma_psnr


def test_self_ensemble_restores_better_than_one_view(photos, tmp_path):
    crops = [rgb_to_luma(photos[n]) if photos[n].ndim == 3 else photos[n] for n in ("camera", "astronaut", "coffee")]
    crops = [c[:160, :224] for c in crops]
    plain, ensemble = Restorer(SHIPPED_GRAY), Restorer(SHIPPED_GRAY, ensemble=True)
    gains = [psnr(c, ensemble(j)) - psnr(c, plain(j)) for c, j in ((c, jpeg_roundtrip(c, 10)) for c in crops)]
    assert np.mean(gains) > 0.02, gains
    Image.fromarray(jpeg_roundtrip(crops[0], 10)).save(tmp_path / "in.png")
    r = subprocess.run([sys.executable, "-m", "serve_bench.restore", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"),
                        "--self-ensemble"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    restored = np.asarray(Image.open(tmp_path / "out" / "in.png"))
    assert restored.shape == crops[0].shape and psnr(crops[0], restored) > psnr(crops[0], plain(jpeg_roundtrip(crops[0], 10)))


def test_evaluate_takes_the_shipped_model_of_each_images_kind(photo_pair, tmp_path, capsys):
    """A folder of gray and color images: each is restored by the shipped model of its kind, as
    restore does (the RGB model on LIVE1 gray gave 28.91 dB at q10 against the gray U-Net's 29.33)."""
    from train.evaluate import main

    gray, rgb, gray2 = photo_pair[0][:64, :64], photo_pair[1][200:264, 200:264], photo_pair[0][64:128, :64]
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.repeat(gray2[..., None], 3, axis=2)).save(tmp_path / "s.png")  # a gray photo stored as RGB
    out = tmp_path / "res.json"
    assert main(["--dataset", str(tmp_path), "--qualities", "10", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert SHIPPED_COLOR.is_file() and res["checkpoint"] == {"gray": str(SHIPPED_GRAY), "color": str(SHIPPED_COLOR)}
    per_image = res["per_image"]["10"]
    for name, img, model in (("g", gray, SHIPPED_GRAY), ("c", rgb, SHIPPED_COLOR), ("s", gray2, SHIPPED_GRAY)):
        assert per_image[name]["model"]["psnr"] == pytest.approx(psnr(img, Restorer(model)(jpeg_roundtrip(img, 10), 10)), abs=1e-9)
    assert "(gray images)" in capsys.readouterr().out
    assert main(["--dataset", str(tmp_path), "--qualities", "10", "--log-mlflow"]) == 2
    assert "give --checkpoint" in capsys.readouterr().err


def test_a_nearly_gray_photo_whose_jpeg_decodes_gray_keeps_the_color_model(photo_pair, tmp_path):
    from train.evaluate import main

    rgb = np.repeat(photo_pair[0][:64, :64, None], 3, axis=2)
    rgb[..., 0] = np.clip(rgb[..., 0].astype(int) + 2, 0, 255)  # a faint red cast that q10 quantizes away
    assert not is_gray(rgb) and is_gray(jpeg_roundtrip(rgb, 10))
    Image.fromarray(rgb).save(tmp_path / "cast.png")
    out = tmp_path / "res.json"
    assert main(["--dataset", str(tmp_path), "--qualities", "10", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["checkpoint"] == str(SHIPPED_COLOR)


def test_restore_gives_a_gray_photo_stored_as_rgb_to_the_gray_model(photo_pair, tmp_path, capsys):
    from serve_bench.restore import main

    gray = photo_pair[0][:96, :128]
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "stored_rgb.jpg", quality=10)
    Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=10)
    assert main([str(tmp_path / "stored_rgb.jpg"), str(tmp_path / "gray.jpg"), "-o", str(tmp_path / "out")]) == 0
    assert "unet gray stored as RGB" in capsys.readouterr().out
    stored, plain = (np.asarray(Image.open(tmp_path / "out" / f"{n}.png")) for n in ("stored_rgb", "gray"))
    assert stored.shape == gray.shape + (3,) and all(np.array_equal(stored[..., c], plain) for c in range(3))


def test_figure_shows_every_model_on_two_images(data_root, tmp_path, capsys):
    from train.figure import main as figure

    out = tmp_path / "fig.png"
    assert figure([str(SHIPPED_GRAY), str(SHIPPED_GRAY), "--labels", "a,b", "--data-root", str(data_root),
                   "--images", "bikes,monarch", "--crop", "96", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 96 * 2, 2 * (96 * 2 + label_height(96 * 2)))
    assert label_height(512) >= 30  # a 1536-px strip of three panels keeps labels readable when previewed
    assert figure([str(SHIPPED_GRAY), "--data-root", str(data_root), "--images", "nope", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: no image named 'nope' in {data_root / 'live1_gray'} (it holds bikes, building2, buildings, ...)"
    # --scale 100 wrote a 38400x13391 PNG (514 MP) that Pillow itself then refuses to open
    assert figure([str(SHIPPED_GRAY), "--data-root", str(data_root), "--images", "bikes", "--scale", "100", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("error: the figure would be at least 38400x12800 (492 MP), more than the "
                                               "179 MP Pillow opens: lower --scale or --crop")
    for args, message in [(["--quality", "0"], "error: --quality must be a JPEG quality in 1..100, got 0"),
                          (["--crop", "0"], "error: --crop must be at least 8 pixels and --scale at least 1, got 0 and 2"),
                          (["--images", "bikes,"], "error: --images must be comma-separated image names, got 'bikes,'"),
                          (["--out", str(tmp_path / "bad.txt")], f"error: --out must name a .png file (the figure is a PNG), got {tmp_path / 'bad.txt'}")]:
        assert figure([str(SHIPPED_GRAY), "--out", str(tmp_path / "bad.png"), *args]) == 2
        assert capsys.readouterr().err.strip() == message and not list(tmp_path.glob("bad.*"))


def test_figure_takes_a_test_sets_images_in_any_format(photo_pair, tmp_path, capsys):
    """Classic test sets ship BMP, PGM or TIFF: the figure looked for <name>.png alone."""
    from train.figure import main as figure

    Image.fromarray(photo_pair[0]).save(tmp_path / "astronaut.bmp")
    Image.fromarray(photo_pair[0][:256, :256]).save(tmp_path / "crop.pgm")
    out = tmp_path / "out" / "fig.png"
    assert figure([str(SHIPPED_GRAY), "--dataset", str(tmp_path), "--images", "astronaut,crop", "--crop", "32", "--scale", "1",
                   "--out", str(out)]) == 0, capsys.readouterr().err
    assert Image.open(out).size == (3 * 32, 2 * (32 + label_height(32)))


def test_shipped_files_fit_the_40_mb_cap():
    for path in (SHIPPED_GRAY, SHIPPED_COLOR):
        assert path.stat().st_size <= 40e6, path


def test_ship_stores_fp16_over_the_cap_and_replaces_only_a_worse_model(photos, tmp_path):
    from train.ship import ship
    out = tmp_path / "shipped.pth"
    report = ship(SHIPPED_GRAY, out, max_mb=5.0)  # the 7.7 MB fp32 gray U-Net
    assert "fp16 weights" in report and out.stat().st_size < 5e6
    assert all(v.dtype in (torch.float16, torch.int64) for v in torch.load(out, weights_only=True)["state_dict"].values())
    gray = rgb_to_luma(photos["coffee"])[:160, :224]
    jpeg = jpeg_roundtrip(gray, 10)
    fp32, fp16 = Restorer(SHIPPED_GRAY)(jpeg), Restorer(out)(jpeg)
    assert psnr(fp32, fp16) > 45 and psnr(gray, fp16) > psnr(gray, jpeg) + 0.5

    with pytest.raises(UserError, match="no better than"):  # same validation PSNR
        ship(SHIPPED_GRAY, out)
    with pytest.raises(UserError, match="not comparable"):  # an RGB model validated on RGB
        ship(SHIPPED_COLOR, out)
    with pytest.raises(UserError, match="over the 1 MB cap"):
        ship(SHIPPED_GRAY, out, max_mb=1.0, force=True)
    assert "7.7 MB" in ship(SHIPPED_GRAY, out, force=True)
    r = subprocess.run([sys.executable, "-m", "train.ship", str(tmp_path / "missing.pth"), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


def test_ship_refuses_the_shipped_file_onto_itself_a_cap_of_zero_and_a_folder(tmp_path):
    from train.ship import ship
    before = SHIPPED_GRAY.read_bytes()
    with pytest.raises(UserError, match="is .* itself: ship a run's checkpoint"):
        ship(SHIPPED_GRAY, force=True, max_mb=5.0)  # would have stored the fp16 copy over its own fp32 source
    with pytest.raises(UserError, match="--max-mb must be positive, got 0"):
        ship(SHIPPED_GRAY, tmp_path / "out.pth", max_mb=0)
    with pytest.raises(UserError, match=f"--out {tmp_path} is a folder: name the model file"):
        ship(SHIPPED_GRAY, tmp_path, force=True)  # was "checkpoint ... not found", naming the folder
    assert SHIPPED_GRAY.read_bytes() == before and not (tmp_path / "out.pth").exists()


def test_ship_makes_each_shipped_file_a_version_of_an_mlflow_registered_model(photos, tmp_path, monkeypatch, capsys):
    """Each ship of a checkpoint whose run is in the store is a new version of the registered model
    named by the file, the alias `shipped` on the newest, its bytes kept in the run's artifacts, and
    the commands take a version or alias where they take a checkpoint; a checkpoint whose run is not
    in the store is shipped all the same and said not registered."""
    import mlflow
    from train_runs import private_store

    from runtime import checkpoint as ckpt
    from runtime.artifacts import file_sha256
    from serve_bench.restore import main as restore
    from train.compare import main as main_compare
    from train.ship import main

    uri = private_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("jpeg-restore", (tmp_path / "artifacts").as_uri()))
    trained = tmp_path / "run" / "image_compression_model.pth"  # the shipped U-Net as that run's best model
    ckpt.save({**torch.load(SHIPPED_GRAY, weights_only=True), "mlflow_run_id": run.info.run_id}, trained)
    out = tmp_path / "image_compression_model.pth"
    files = []
    # the same validation PSNR: forced the second time, in fp16 (other bytes from the same run)
    for version, args in ((1, []), (2, ["--force", "--max-mb", "5"])):
        assert main([str(trained), "--out", str(out), *args]) == 0
        said = capsys.readouterr().out.strip().splitlines()
        assert said[-1] == f"registered in MLflow as image_compression_model version {version} (alias shipped), " \
                           f"from run {run.info.run_id}", said
        files.append(out.read_bytes())
    shipped = client.get_model_version_by_alias("image_compression_model", "shipped")
    assert int(shipped.version) == 2 and shipped.run_id == run.info.run_id
    assert shipped.tags["sha256"] == file_sha256(out) and shipped.tags["arch"] == "unet" and shipped.tags["val_psnr"] == "32.3331"
    for version, model in ((1, "models:/image_compression_model/1"), (2, "models:/image_compression_model@shipped")):
        got = Path(mlflow.artifacts.download_artifacts(model, dst_path=str(tmp_path / f"got{version}")))
        assert (got / "image_compression_model.pth").read_bytes() == files[version - 1]  # the first kept by the second
    assert files[0] != files[1]
    monkeypatch.chdir(tmp_path)  # versions are downloaded into outputs/registry/ once
    Image.fromarray(jpeg_roundtrip(rgb_to_luma(photos["coffee"])[:96, :128], 10)).save(tmp_path / "photo.jpg", quality=10)
    restored = {}
    for name, model in (("alias", "models:/image_compression_model@shipped"), ("v1", "models:/image_compression_model/1"),
                        ("file", str(out))):
        assert restore([str(tmp_path / "photo.jpg"), "-o", str(tmp_path / name), "--checkpoint", model]) == 0
        restored[name] = (tmp_path / name / "photo.png").read_bytes()
    assert (tmp_path / "outputs/registry/image_compression_model/1/image_compression_model.pth").read_bytes() == files[0]
    assert restored["alias"] == restored["file"]  # the alias: the file shipped now (version 1: the fp32 weights, above)
    capsys.readouterr()
    assert restore([str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "none"), "--checkpoint", "models:/image_compression_model/9"]) == 2
    assert capsys.readouterr().err.strip() == "error: models:/image_compression_model/9: Model Version (name=image_compression_model, " \
                                              f"version=9) not found (store {uri})"
    assert torch.load(out, weights_only=True)["restore_max_quality"] == 75  # restore's bound, as the checkpoint had it
    assert main_compare(["--experiment", "jpeg-restore", "--out", str(tmp_path / "compare")]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith(f"| {run.info.run_name} (shipped as image_compression_model) |"), row

    assert main([str(SHIPPED_GRAY), "--out", str(tmp_path / "elsewhere.pth")]) == 0  # its run: another store's
    said = capsys.readouterr().out.strip().splitlines()
    assert said[-1] == f"not registered in MLflow: run 829b448857454669bd7d40b27bdf8c50 is not in the store {uri} " \
                       "(a model trained against another store: point MLFLOW_TRACKING_URI at that one)", said
    assert (tmp_path / "elsewhere.pth").is_file() and [m.name for m in client.search_registered_models()] == ["image_compression_model"]


def test_register_gives_a_fresh_store_the_shipped_files_and_a_run_from_each_ones_record(tmp_path, monkeypatch, capsys):
    """A fresh clone's store holds neither shipped model nor its training run (which stayed in the
    store it trained against): --register makes the run from the file's record, which the file's
    run id then finds, and registers the file; a second --register adds nothing."""
    import mlflow
    from train_runs import private_store

    from runtime.mlflow_store import log_to_run
    from train.ship import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", private_store(tmp_path))
    assert main(["--register"]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    client = mlflow.MlflowClient()
    for shipped in (SHIPPED_GRAY, SHIPPED_COLOR):
        blob = torch.load(shipped, weights_only=True)
        version = client.get_model_version_by_alias(shipped.stem, "shipped")
        run = client.get_run(version.run_id)
        assert f"{shipped.name}: its training run {blob['mlflow_run_id']} is not in the store: made run {run.info.run_id} " \
               "from the file's record" in said, said
        assert run.data.tags["offline_run_id"] == blob["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.params["model.arch"] == blob["arch"] and run.data.params["data.mode"] == blob["mode"]
        assert run.data.metrics["val_psnr"] == blob["metrics"]["val_psnr"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] == [blob["step"]]
        assert log_to_run(blob["mlflow_run_id"], {"live1_psnr_q10": 1.0}) == f"logged 1 metrics to MLflow run {run.info.run_id}"
    assert main(["--register", str(SHIPPED_GRAY)]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert said[1].startswith("image_compression_model.pth is image_compression_model version 1 in MLflow already"), said
    assert len(client.search_model_versions("name='image_compression_model'")) == 1 and len(mlflow.search_runs(search_all_experiments=True)) == 2
    with pytest.raises(SystemExit):
        main(["--register", "--force"])
    assert "--register ships nothing: it takes no --out, --force or --max-mb" in capsys.readouterr().err
