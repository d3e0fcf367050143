"""ONNX export, runners, latency benchmark, TensorRT (GPU only) and the restore command, on real
images with real ONNX Runtime. A tiny DnCNN is trained for real (about 15 s) as the model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.images import jpeg_bytes, jpeg_roundtrip, read_image
from export.to_onnx import check_parity, export_onnx
from serve_bench.benchmark import markdown_table, run_benchmark
from serve_bench.runners import RUNNERS, tensorrt_status
from train import checkpoint as ckpt
from train.inference import image_to_tensor, native_bf16
from train.metrics import psnr
from train.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = {"dncnn": {"depth": 4, "width": 8}, "unet": {"width": 8, "levels": 2}, "arcnn": {"widths": [8, 8, 4]},
        "attention": {"width": 8, "groups": 1, "blocks": 1, "reduction": 4}, "autoencoder": {"tile": 32, "width": 8, "latent": 32}}


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A small DnCNN trained for 150 steps on Train400 q10: beats JPEG on LIVE1."""
    tmp = tmp_path_factory.mktemp("trained")
    env = {**os.environ, "JPEG_RESTORE_DATA_ROOT": str(data_root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    sets = ["model.kwargs={depth=6, width=32}", "data.qualities=[10]", "data.batch_size=16", "data.patch_size=48",
            "train.max_steps=150", "train.val_every=150", "train.log_every=50", "optim.lr=1e-3", "schedule.warmup_steps=0",
            "data.backend=torch", "data.workers=0", "data.limit=120"]
    proc = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), "--config", str(REPO / "configs" / "dncnn.toml"),
                           "--out", str(tmp / "out"), *[a for s in sets for a in ("--set", s)]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out" / "image_compression_model.pth", env


def _tiny_checkpoint(arch: str, path: Path, channels: int = 1) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, channels=channels, **TINY[arch])
    for p in model.parameters():  # zero-initialised last layers would make every model the identity
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 and not p.abs().sum() else None
    ckpt.save(ckpt.model_checkpoint(model, arch, TINY[arch], "gray" if channels == 1 else "rgb", {}, {}, 0), path)
    return path


@pytest.mark.parametrize("arch", sorted(TINY))
def test_onnx_round_trip_parity_for_every_architecture(arch, tmp_path, live1_pair):
    """A real LIVE1 crop (odd size) through PyTorch and through ONNX Runtime: same pixels."""
    path = _tiny_checkpoint(arch, tmp_path / f"{arch}.pth")
    info = export_onnx(path, tmp_path / f"{arch}.onnx")
    assert info["tile"] == (32 if arch == "autoencoder" else 0)
    model, _ = ckpt.load_model(path)
    x = image_to_tensor(jpeg_roundtrip(live1_pair[0][:75, :101], 10), "cpu")
    torch_out = RUNNERS["torch"](model).restore(x)
    ort_out = RUNNERS["onnxruntime"](tmp_path / f"{arch}.onnx", tile=info["tile"], overlap=model.overlap if info["tile"] else 16).restore(x)
    assert ort_out.shape == x.shape
    assert float((torch_out - ort_out).abs().max()) <= 1e-4


def test_to_onnx_cli_checks_parity_on_live1(trained, tmp_path):
    path, env = trained
    proc = subprocess.run([sys.executable, str(REPO / "export" / "to_onnx.py"), "--checkpoint", str(path),
                           "--out", str(tmp_path / "m.onnx")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "onnx.checker passed" in proc.stdout and "parity on LIVE1 q10" in proc.stdout and ": passed" in proc.stdout
    import onnx

    model = onnx.load(tmp_path / "m.onnx")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][1] == 1 and all(d.dim_param for i, d in enumerate(dims) if i != 1)


def test_parity_numbers_on_real_images(trained, tmp_path):
    path, _ = trained
    export_onnx(path, tmp_path / "m.onnx")
    p = check_parity(path, tmp_path / "m.onnx")
    assert p["source"] == "LIVE1" and len(p["images"]) == 3
    assert p["max_abs_diff"] <= 1e-4 and p["max_psnr_diff"] <= 0.01 and p["ok"]


def test_benchmark_measures_torch_and_onnxruntime_and_says_why_not_tensorrt(trained, tmp_path):
    path, _ = trained
    export_onnx(path, tmp_path / "m.onnx")
    result = run_benchmark(path, tmp_path / "m.onnx", shapes=[(64, 64, 1), (64, 64, 2)], warmup=1, iters=3,
                           backends=("torch", "onnxruntime", "tensorrt"))
    labels = {(r["backend"], r["batch"]) for r in result["rows"]}
    assert {("torch fp32", 1), ("torch fp32", 2), ("onnxruntime fp32", 1)} <= labels
    if native_bf16(torch.device("cpu")):
        assert ("torch bf16 NHWC", 2) in labels
    else:
        assert "emulated" in result["unavailable"]["torch bf16 NHWC"] and "torch bf16 NHWC" not in {b for b, _ in labels}
    for r in result["rows"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["images_per_s"] > 0 and r["speedup_vs_torch"] > 0
    assert result["matmul_peak_gflops"]["fp32"] > 0 and result["system"]["onnxruntime"]
    table = markdown_table(result)
    if tensorrt_status():
        assert "tensorrt" in result["unavailable"] and "not measured" in table


def test_to_trt_cli_without_gpu_still_exports_and_benchmarks(trained, tmp_path):
    path, env = trained
    proc = subprocess.run([sys.executable, str(REPO / "export" / "to_trt.py"), "--checkpoint", str(path), "--quick",
                           "--iters", "2", "--backends", "torch,onnxruntime,tensorrt", "--out", str(tmp_path / "deploy")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "deploy" / "model.onnx").is_file() and (tmp_path / "deploy" / "latency.md").is_file()
    result = json.loads((tmp_path / "deploy" / "latency.json").read_text())
    assert {r["backend"] for r in result["rows"]} >= {"torch fp32", "onnxruntime fp32"}
    assert "logged latency to MLflow run" in proc.stdout
    if tensorrt_status():
        assert f"TensorRT: not built and not measured: {tensorrt_status()}" in proc.stdout


@pytest.mark.skipif(tensorrt_status() is not None, reason=f"TensorRT cannot run here: {tensorrt_status()}")
def test_tensorrt_engine_matches_pytorch(trained, tmp_path):
    from export.to_trt import build_engine, engine_parity

    path, _ = trained
    export_onnx(path, tmp_path / "m.onnx")
    for precision, tol in (("fp32", 1e-3), ("fp16", 0.05)):
        engine = build_engine(tmp_path / "m.onnx", tmp_path / f"m.{precision}.engine", precision == "fp16", 1,
                              timing_cache=tmp_path / "timing.cache")
        p = engine_parity(path, engine, None)
        assert p["max_psnr_diff"] <= tol


def test_restore_command_beats_jpeg_on_live1_gray_and_color(trained, tmp_path, data_root):
    path, env = trained
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    originals = {"bikes_gray": read_image(data_root / "live1_gray" / "bikes.png", "gray"),
                 "bikes_color": read_image(data_root / "live1_color" / "bikes.png", "rgb")}
    for name, img in originals.items():
        (inp / f"{name}.jpg").write_bytes(jpeg_bytes(img, 10))
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (inp / "already.png").write_bytes((inp / "bikes_gray.jpg").read_bytes())
    for backend in ("torch", "onnxruntime"):
        proc = subprocess.run([sys.executable, "-m", "serve_bench.restore", str(inp), "-o", str(out / backend), "--checkpoint",
                               str(path), "--backend", backend], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
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


@pytest.mark.parametrize("args, message", [(["missing.jpg"], "does not exist"),
                                           (["--checkpoint", "nope.pth", "."], "not found")])
def test_restore_command_errors_are_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "serve_bench.restore", *args, "-o", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and message in proc.stderr
