"""ONNX export, runners, latency benchmark, TensorRT (GPU only) and the restore command, on real
photographs with real ONNX Runtime. A small DnCNN is trained for real (about 15 s) as the model,
on tiles of the embedded photographs (camera and coffee held out for the restore test)."""
from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from train_runs import private_store, run_on_terminal

from data_pipeline.images import jpeg_bytes, jpeg_roundtrip, read_image
from export.artifacts import onnx_path
from export.latency import markdown_table, run_benchmark
from export.onnx_export import check_parity, export_onnx
from export.parity import parity
from runtime import checkpoint as ckpt
from runtime.device import native_bf16
from runtime.inference import Restorer, image_to_tensor
from runtime.metrics.psnr import psnr
from runtime.models import architectures, build_model, tiny_kwargs
from runtime.runners import make_runner, runners
from serve_bench.restore import main as restore_main

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = ("camera", "coffee")
TRT_WHY = runners()["tensorrt"].unavailable("cuda")


def no_data_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JPEG_RESTORE_DATA_ROOT"}
    return {**env, "MLFLOW_TRACKING_URI": private_store(tmp)}


@pytest.fixture(scope="module")
def trained(tiles_dir, tmp_path_factory):
    """A small DnCNN trained for 150 steps at q10 on the photograph tiles (not camera, coffee)."""
    tmp = tmp_path_factory.mktemp("trained")
    tiles = tmp / "tiles"
    tiles.mkdir()
    for p in tiles_dir.iterdir():
        if not p.name.startswith(HELD_OUT):
            shutil.copy(p, tiles / p.name)
    env = no_data_env(tmp)
    sets = ["model.kwargs={depth=6, width=32}", "data.qualities=[10]", "data.batch_size=16", "data.patch_size=48",
            "train.max_steps=150", "train.val_every=150", "train.log_every=50", "optim.lr=1e-3", "schedule.warmup_steps=0",
            "data.backend=torch", "data.workers=0", f"data.dataset={json.dumps(str(tiles))}"]
    proc = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), "--config", str(REPO / "configs" / "dncnn.toml"),
                           "--out", str(tmp / "out"), *[a for s in sets for a in ("--set", s)]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out" / "image_compression_model.pth", env


def tiny_checkpoint(arch: str, path: Path, channels: int = 1, kwargs: dict | None = None) -> Path:
    torch.manual_seed(0)
    kwargs = tiny_kwargs(arch) if kwargs is None else kwargs
    model = build_model(arch, channels=channels, **kwargs)
    for p in model.parameters():  # zero-initialised last layers would make every model the identity
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 and not p.abs().sum() else None
    ckpt.save(ckpt.model_checkpoint(model, arch, kwargs, "gray" if channels == 1 else "rgb", {}, {}, 0), path)
    return path


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """arch -> (its tiny checkpoint, the info of its ONNX export), each exported once for the tests
    below (torch's export of the tiny NAFNet with dynamic height and width takes 9 s here)."""
    @functools.cache
    def export(arch: str) -> tuple[Path, dict]:
        folder = tmp_path_factory.mktemp(f"tiny_{arch}")
        path = tiny_checkpoint(arch, folder / f"{arch}.pth")
        return path, export_onnx(path, folder / f"{arch}.onnx")
    return export


@pytest.mark.parametrize("arch", architectures())
def test_onnx_round_trip_parity_for_every_architecture(arch, tiny_export, photo_pair):
    """A real photograph crop (odd size) through PyTorch and through ONNX Runtime: same pixels."""
    path, info = tiny_export(arch)
    model, _ = ckpt.load_model(path)
    assert info["tile"] == getattr(model, "tile", 0)
    x = image_to_tensor(jpeg_roundtrip(photo_pair[0][:75, :101], 10), "cpu")
    torch_out = make_runner("torch", path).restore(x)
    ort_out = make_runner("onnxruntime", info["path"]).restore(x)  # tile size from the sidecar
    assert ort_out.shape == x.shape
    assert float((torch_out - ort_out).abs().max()) <= 1e-4


def test_a_unet_with_a_pixel_unshuffle_stem_exports_with_the_same_pixels(tmp_path, photo_pair):
    """The stem's pixel unshuffle and the head's shuffle in ONNX, on an odd-sized crop (padded to 16)."""
    path = tiny_checkpoint("unet", tmp_path / "stem.pth", kwargs={**tiny_kwargs("unet"), "unshuffle": 2})
    info = export_onnx(path, tmp_path / "stem.onnx")
    x = image_to_tensor(jpeg_roundtrip(photo_pair[0][:75, :101], 10), "cpu")
    torch_out, ort_out = make_runner("torch", path).restore(x), make_runner("onnxruntime", info["path"]).restore(x)
    assert ort_out.shape == x.shape and float((torch_out - x).abs().max()) > 1e-2  # not the identity's check
    assert float((torch_out - ort_out).abs().max()) <= 1e-4


@pytest.mark.parametrize("arch", ["nafnet", "restormer"])
def test_channel_layernorm_exports_as_one_fused_node(arch, tiny_export):
    """Each LayerNorm2d is one LayerNormalization node in the ONNX graph (which ONNX Runtime and
    TensorRT run fused), not the mean, variance and division spelled out."""
    import onnx

    from runtime.models.nafnet import LayerNorm2d

    path, info = tiny_export(arch)
    norms = sum(isinstance(m, LayerNorm2d) for m in ckpt.load_model(path)[0].modules())
    ops = [n.op_type for n in onnx.load(info["path"]).graph.node]
    assert norms > 0 and ops.count("LayerNormalization") == norms and "Pow" not in ops


def test_to_onnx_cli_checks_parity(trained, tmp_path):
    path, env = trained
    proc = subprocess.run([sys.executable, str(REPO / "export" / "to_onnx.py"), "--checkpoint", str(path),
                           "--out", str(tmp_path / "m.onnx")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "onnx.checker passed" in proc.stdout and "parity on scikit-image (no data root) q10" in proc.stdout
    assert ": passed" in proc.stdout
    import onnx

    model = onnx.load(tmp_path / "m.onnx")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][1] == 1 and all(d.dim_param for i, d in enumerate(dims) if i != 1)
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    assert sidecar["arch"] == "dncnn" and len(sidecar["checkpoint_sha256"]) == 64


def test_parity_numbers_on_real_images(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("JPEG_RESTORE_DATA_ROOT", raising=False)
    path, _ = trained
    export_onnx(path, tmp_path / "m.onnx")
    p = check_parity(path, tmp_path / "m.onnx")
    assert p["source"] == "scikit-image (no data root)" and len(p["images"]) == 3
    assert p["max_abs_diff"] <= 1e-4 and p["max_psnr_diff"] <= 0.01 and p["ok"]


def test_export_replaces_its_own_files_but_not_the_users(trained, tmp_path):
    from data_pipeline.errors import UserError
    from export.aoti_export import export_aoti

    path, _ = trained
    export_onnx(path, tmp_path / "m.onnx")
    export_onnx(path, tmp_path / "m.onnx")  # an earlier export (its sidecar beside it) is replaced
    users = tmp_path / "notes.onnx"
    users.write_text("the user's")
    with pytest.raises(UserError, match="notes.onnx exists and is not a file exported by this project"):
        export_onnx(path, users)
    (tmp_path / "folder.pt2").mkdir()
    with pytest.raises(UserError, match="folder.pt2 exists and is not a file exported by this project"):
        export_aoti(path, tmp_path / "folder.pt2")
    assert users.read_text() == "the user's" and not (tmp_path / "notes.onnx.json").exists()


def test_exports_of_checkpoints_with_one_name_keep_each_other(tmp_path):
    """Every run's checkpoint is image_compression_model.pth: exports named after the stem alone let
    the second run's ONNX file (and TensorRT engines, latency table) replace the first one's."""
    from export.artifacts import engine_path, ensure_onnx, latency_dir

    for run in ("run1", "run2"):
        (tmp_path / run).mkdir()
    first = tiny_checkpoint("dncnn", tmp_path / "run1" / "image_compression_model.pth")
    second = tiny_checkpoint("unet", tmp_path / "run2" / "image_compression_model.pth")
    deploy = tmp_path / "deploy"
    made = {c: ensure_onnx(c, deploy) for c in (first, second)}
    assert made[first] != made[second] and all(p.is_file() for p in made.values())
    assert json.loads(Path(f"{made[first]}.json").read_text())["arch"] == "dncnn"
    before = made[first].stat().st_mtime_ns
    assert ensure_onnx(first, deploy) == made[first] and made[first].stat().st_mtime_ns == before  # still current
    assert engine_path(first, "fp16", deploy) != engine_path(second, "fp16", deploy)
    assert latency_dir(first) != latency_dir(second)


def test_restore_takes_a_folder_named_like_an_image_when_the_name_ends_with_a_slash(tmp_path, photos, in_process):
    (tmp_path / "camera.jpg").write_bytes(jpeg_bytes(photos["camera"][:64, :64], 10))
    proc = in_process(restore_main, tmp_path / "camera.jpg", "-o", f"{tmp_path / 'restored.png'}/",
                      "--checkpoint", tiny_checkpoint("unet", tmp_path / "gray.pth"))
    assert proc.returncode == 0 and (tmp_path / "restored.png" / "camera.png").is_file(), proc.stderr


def test_restore_exports_only_the_models_its_images_need(tmp_path, photos, in_process):
    """Gray photos through --backend onnxruntime exported the color model too (aoti: 31 s of compiling
    of NAFNet for nothing on a 2-core CPU)."""
    gray, color = tiny_checkpoint("unet", tmp_path / "gray.pth"), tiny_checkpoint("unet", tmp_path / "color.pth", channels=3)
    (tmp_path / "camera.jpg").write_bytes(jpeg_bytes(photos["camera"][:64, :64], 10))
    (tmp_path / "coffee.jpg").write_bytes(jpeg_bytes(photos["coffee"][:64, :64], 10))
    deploy = tmp_path / "deploy"
    for image, exported in (("camera.jpg", {gray}), ("coffee.jpg", {gray, color})):
        proc = in_process(restore_main, tmp_path / image, "-o", tmp_path / "out", "--checkpoint", gray, "--color-checkpoint", color,
                          "--backend", "onnxruntime", "--deploy-dir", deploy)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert {c for c in (gray, color) if onnx_path(c, deploy).is_file()} == exported, image


def test_benchmark_measures_torch_and_onnxruntime_and_says_why_not_tensorrt(trained, tmp_path):
    path, _ = trained
    result = run_benchmark(path, shapes=[(64, 64, 1), (64, 64, 2)], warmup=1, iters=3,
                           backends=("torch", "onnxruntime", "tensorrt"), deploy_dir=tmp_path)
    labels = {(r["backend"], r["batch"]) for r in result["rows"]}
    assert {("torch fp32", 1), ("torch fp32", 2), ("torch fp32 NHWC", 1), ("onnxruntime fp32", 1)} <= labels
    layouts = {r["backend"]: r["channels_last"] for r in result["rows"] if r["runner"] == "torch"}
    assert layouts["torch fp32"] is False and layouts["torch fp32 NHWC"] is True  # the reference stays NCHW
    assert onnx_path(path, tmp_path).is_file()  # exported on demand, named after the checkpoint
    if native_bf16(torch.device("cpu")):
        assert ("torch bf16 NHWC", 2) in labels
    else:
        assert "emulated" in result["unavailable"]["torch bf16 NHWC"] and "torch bf16 NHWC" not in {b for b, _ in labels}
    for r in result["rows"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["speedup_vs_torch"] > 0 and r["first_call_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["p50_ms"] * 1000, rel=1e-6)  # from the median
        assert r["device"] == "cpu" and r["device_name"]
    assert {r["provider"] for r in result["rows"] if r["backend"].startswith("onnxruntime")} == {"CPUExecutionProvider"}
    assert result["matmul_peak_gflops"]["fp32"] > 0 and result["system"]["onnxruntime"]
    table = markdown_table(result)
    assert "cpu / CPUExecutionProvider" in table
    if TRT_WHY:
        assert "tensorrt fp16" in result["unavailable"] and "not measured" in table


def test_the_latency_command_shows_its_progress_on_a_terminal(trained, tmp_path):
    """Minutes of timing (to_trt's: 5 on 2 cores) came without a line until the table."""
    path, _ = trained
    code, shown, _ = run_on_terminal([sys.executable, "-m", "serve_bench.benchmark", "--checkpoint", str(path), "--backends", "torch",
                                      "--shapes", "32x32x1,32x48x2", "--iters", "1", "--no-mlflow", "--out", str(tmp_path / "lat")])
    timed = sum(isinstance(options, dict) for _, options in runners()["torch"].variants("cpu"))  # not those it says why not
    assert code == 0 and re.search(rf"torch fp32 1x32x32: +0%\|.*\| 0/{2 * timed} \[", shown), shown[-2000:]
    assert re.search(rf"torch fp32 2x32x48: +\d+%\|.*\| {timed}/{2 * timed} \[", shown), shown[-2000:]  # the second shape


def test_inference_on_cpu_runs_channels_last_with_the_same_output(trained):
    """CPUs run the convolutions faster in NHWC: restore's runner and the Restorer take it there."""
    path, _ = trained
    x = torch.rand(1, 1, 96, 80)
    default, nchw = make_runner("torch", path, "cpu"), make_runner("torch", path, "cpu", channels_last=False)
    assert default.channels_last and not nchw.channels_last
    torch.testing.assert_close(default(x), nchw(x), atol=1e-5, rtol=0)
    conv = next(m for m in Restorer(path).model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


def test_restore_runs_bf16_where_the_cpu_computes_it_natively(trained, tmp_path, photos, in_process):
    """--precision auto (the default): bf16 autocast where it is native (1.8x faster for the shipped
    gray model on an AVX-512 BF16 CPU), fp32 elsewhere; fp32 gives the Restorer's own output."""
    path, _ = trained
    (tmp_path / "camera.jpg").write_bytes(jpeg_bytes(photos["camera"], 10))
    out = {}
    for precision in ("auto", "fp32", "bf16"):
        proc = in_process(restore_main, tmp_path / "camera.jpg", "-o", tmp_path / precision, "--checkpoint", path, "--precision", precision)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ran = {"auto": "bf16" if native_bf16(torch.device("cpu")) else "fp32"}.get(precision, precision)
        assert f"dncnn gray, torch {ran})" in proc.stdout, proc.stdout
        out[precision] = read_image(tmp_path / precision / "camera.png", "gray")
    jpeg = read_image(tmp_path / "camera.jpg", "gray")
    assert (out["fp32"] == Restorer(path)(jpeg)).all()
    assert psnr(out["fp32"], out["bf16"]) > 40


def test_compiled_runner_restores_images_of_many_sizes_without_recompiling(trained):
    """restore --backend torch-compile on a folder of photos compiled once per image size (6 s each
    on CPU) and gave up after 8, with a warning: small images now run eagerly, larger ones compiled
    in 512-px tiles, one shape."""
    path, _ = trained
    compiled, eager = make_runner("torch-compile", path, "cpu"), make_runner("torch", path, "cpu")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for h, w in [(40, 48), (56, 40), (200, 96), (600, 520), (530, 700)]:
            x = torch.rand(1, 1, h, w)
            torch.testing.assert_close(compiled.restore(x), eager.restore(x), atol=1e-4, rtol=0)


def test_to_trt_cli_without_gpu_still_exports_and_benchmarks(trained, tmp_path):
    path, env = trained
    proc = subprocess.run([sys.executable, str(REPO / "export" / "to_trt.py"), "--checkpoint", str(path), "--quick",
                           "--iters", "2", "--backends", "torch,onnxruntime,tensorrt", "--out", str(tmp_path / "deploy")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert onnx_path(path, tmp_path / "deploy").is_file() and (tmp_path / "deploy" / "latency.md").is_file()
    result = json.loads((tmp_path / "deploy" / "latency.json").read_text())
    assert {r["backend"] for r in result["rows"]} >= {"torch fp32", "onnxruntime fp32"}
    assert "metrics to MLflow run" in proc.stdout
    if TRT_WHY:
        assert f"TensorRT: not built and not measured: {TRT_WHY}" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(TRT_WHY is not None, reason=f"TensorRT cannot run here: {TRT_WHY}")
def test_tensorrt_engine_matches_pytorch(trained, tmp_path):
    from export.to_trt import build_engine

    path, _ = trained
    export_onnx(path, tmp_path / "m.onnx")
    for precision, tol in (("fp32", 1e-3), ("fp16", 0.05)):
        engine = build_engine(tmp_path / "m.onnx", tmp_path / f"m.{precision}.engine", precision == "fp16", 1,
                              timing_cache=tmp_path / "timing.cache")
        p = parity(path, make_runner("tensorrt", engine, "cuda"), None, fp16=precision == "fp16")
        assert p["max_psnr_diff"] <= tol


def test_restore_command_beats_jpeg_on_held_out_gray_and_color(trained, tmp_path, photos):
    path, env = trained
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    originals = {"camera_gray": photos["camera"], "coffee_color": photos["coffee"]}
    for name, img in originals.items():
        (inp / f"{name}.jpg").write_bytes(jpeg_bytes(img, 10))
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (inp / "already.png").write_bytes((inp / "camera_gray.jpg").read_bytes())
    for backend in ("torch", "onnxruntime"):
        proc = subprocess.run([sys.executable, "-m", "serve_bench.restore", str(inp), "-o", str(out / backend), "--checkpoint",
                               str(path), "--backend", backend, "--deploy-dir", str(tmp_path / "deploy")],
                              env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 1, proc.stderr[-2000:]  # one input is broken
        assert "skipped" in proc.stderr and "broken.jpg" in proc.stderr and "Traceback" not in proc.stderr
        assert "luma only" in proc.stdout
        for name, original in originals.items():
            jpeg = read_image(inp / f"{name}.jpg", "rgb" if original.ndim == 3 else "gray")
            restored = read_image(out / backend / f"{name}.png", "rgb" if original.ndim == 3 else "gray")
            assert restored.shape == original.shape
            assert psnr(original, restored) > psnr(original, jpeg) + 0.2, (backend, name)
    # writing into the input folder never replaces an input
    before = (inp / "already.png").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "serve_bench.restore", str(inp / "already.png"), "-o", str(inp),
                           "--checkpoint", str(path)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 1 and "would overwrite an input" in proc.stderr
    assert (inp / "already.png").read_bytes() == before


@pytest.mark.parametrize("args, message", [(["missing.jpg", "-o", "out"], "does not exist"),
                                           (["--checkpoint", "nope.pth", ".", "-o", "out"], "not found"),
                                           ([".", "-o", "."], "is one of the input folders: the next run would restore"),
                                           (["photo.jpg", "-o", "restored.png"], "-o restored.png names an image, and -o takes a folder"),
                                           ([".", "-o", "out", "--backend", "onnxruntime", "--precision", "bf16"],
                                            "--precision is for the torch backends; onnxruntime runs its exported file's")])
def test_restore_command_errors_are_one_line(tmp_path, args, message, in_process):
    proc = in_process(restore_main, *args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and message in proc.stderr
    assert not list(tmp_path.iterdir())  # no output folder left behind


@pytest.mark.slow
def test_aoti_package_runs_without_the_model_code_and_matches_pytorch(tmp_path, photo_pair):
    """torch.export + AOTInductor on this CPU: a .pt2 that a bare `import torch` runs, at any size;
    exported without the FutureWarning torch's own graph copy printed (restore --backend aoti, to_trt)."""
    from export.aoti_export import export_aoti

    path = tiny_checkpoint("unet", tmp_path / "unet.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = export_aoti(path, tmp_path / "unet.cpu.pt2", "cpu")
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert info["multiple"] == 4 and info["compile_s"] > 0 and json.loads((tmp_path / "unet.cpu.pt2.json").read_text())["device"] == "cpu"
    code = ("import torch; p = torch._inductor.aoti_load_package(%r); "
            "print(tuple(p(torch.rand(3, 1, 40, 56)).shape))") % str(tmp_path / "unet.cpu.pt2")
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bare.returncode == 0 and bare.stdout.strip() == "(3, 1, 40, 56)", bare.stderr[-2000:]
    x = image_to_tensor(jpeg_roundtrip(photo_pair[0][:75, :101], 10), "cpu")  # odd size: padded to 4, cropped back
    ref = make_runner("torch", path).restore(x)
    out = make_runner("aoti", tmp_path / "unet.cpu.pt2").restore(x)
    assert out.shape == x.shape and float((ref - out).abs().max()) <= 1e-4


def test_latency_shapes_parse_and_default_per_device():
    from export.latency import GPU_SHAPES, SHAPES, default_shapes, parse_shapes

    assert parse_shapes("512x512x1,1024x768x8") == [(512, 512, 1), (1024, 768, 8)]
    for bad in ("512x512", "512x512x0", "big", ""):
        with pytest.raises(ValueError, match="HxWxB"):
            parse_shapes(bad)
    assert default_shapes("cpu") == SHAPES and default_shapes("cuda:0") == GPU_SHAPES
    assert (1024, 1024, 8) in GPU_SHAPES and (512, 512, 8) in GPU_SHAPES


def test_the_latency_benchmark_keeps_each_checkpoints_table(tmp_path, monkeypatch, capsys):
    """Its default folder was one for every checkpoint: measuring a second one replaced the first one's table."""
    from serve_bench.benchmark import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    checkpoints = [tiny_checkpoint("dncnn", tmp_path / "a" / "image_compression_model.pth"),
                   tiny_checkpoint("unet", tmp_path / "b" / "image_compression_model.pth")]  # one stem, as runs' are
    for checkpoint in checkpoints:
        assert main(["--checkpoint", str(checkpoint), "--device", "cpu", "--backends", "torch", "--shapes", "64x64x1",
                     "--iters", "1", "--no-mlflow"]) == 0
    tables = sorted((tmp_path / "outputs" / "latency").glob("*/latency.json"))
    assert sorted(json.loads(t.read_text())["checkpoint"] for t in tables) == sorted(map(str, checkpoints)), tables
    assert all(t.parent.name.startswith("image_compression_model-") and (t.parent / "latency.md").is_file() for t in tables)


def test_restore_says_tensorrt_cannot_run_here_before_any_work(tmp_path, in_process):
    """It said that no engine was built and to build one with to_trt.py, which cannot build one here either."""
    why = runners()["tensorrt"].unavailable("cpu")
    if why is None:
        pytest.skip("TensorRT runs here")
    proc = in_process(restore_main, "missing.jpg", "-o", "out", "--device", "cpu", "--backend", "tensorrt", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: tensorrt: {why}"
    assert not list(tmp_path.iterdir())


def test_export_and_latency_commands_default_to_the_shipped_model_from_any_folder(tmp_path, in_process):
    """Their default was image_compression_model.pth in the current folder: outside the repository
    they stopped with 'not found', where restore and evaluate take the shipped model."""
    from export.to_onnx import main as to_onnx_main
    from serve_bench.benchmark import main as benchmark_main

    proc = in_process(to_onnx_main, "--fp16", "--out", "shipped.onnx", cwd=tmp_path)
    assert proc.returncode == 0 and "exported unet (gray)" in proc.stdout, proc.stderr
    proc = in_process(benchmark_main, "--device", "cpu", "--backends", "torch", "--shapes", "64x64x1", "--iters", "1",
                      "--no-mlflow", "--out", "latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "latency" / "latency.json").read_text())["checkpoint"] == str(REPO / "image_compression_model.pth")


@pytest.mark.parametrize("module", ["serve_bench.benchmark", "export.to_trt"])
@pytest.mark.parametrize("args, message", [(["--backends", "torch,tensorrtt"], "error: unknown backend 'tensorrtt'; known: "),
                                           (["--shapes", "512x512"], "error: --shapes takes HxWxB items"),
                                           (["--iters", "0"], "error: --iters must be at least 1, got 0")])
def test_latency_commands_reject_bad_options_in_one_line_before_any_work(tmp_path, capsys, module, args, message):
    """Both latency commands share their options; a bad one stops them before the checkpoint is read."""
    main = importlib.import_module(module).main
    assert main(["--checkpoint", str(tmp_path / "missing.pth"), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
