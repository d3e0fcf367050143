"""Trainer building blocks on tiny tensors: schedules, losses, precision contexts, checkpoints."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runtime import checkpoint as ckpt
from runtime.device import autocast_for, emulated_precision_warning, native_bf16, resolve_precision
from runtime.models import build_model, macs_per_pixel, tiny_kwargs
from runtime.tiling import restore_tensor, self_ensemble
from train.loop.budget import TimeBudget, set_total_steps
from train.loop.config import load_config
from train.loop.optim import LOSSES, blocking_effect_factor, build_loss, build_optimizer, build_scheduler
from train.loop.state import latest_state, prune_states, state_path

REPO = Path(__file__).resolve().parents[1]


def _lrs(overrides, steps):
    cfg = load_config(None, ["optim.lr=1e-3", f"train.max_steps={steps}", *overrides])
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_cosine_reaches_peak_then_min():
    lrs = _lrs(["schedule.name=cosine", "schedule.warmup_steps=10", "schedule.min_lr=1e-5"], 100)
    assert lrs[0] < 1e-5 and lrs[0] < lrs[5] < lrs[10]
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_step_schedule_halves_every_step_size():
    lrs = _lrs(["schedule.name=step", "schedule.step_size=10", "schedule.gamma=0.5"], 30)
    assert lrs[0] == lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(5e-4) and lrs[25] == pytest.approx(2.5e-4)


def test_plateau_decays_after_patience_without_improvement():
    cfg = load_config(None, ["schedule.name=plateau", "schedule.patience=1", "schedule.gamma=0.1"])
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(cfg, opt)
    for psnr in (30.0, 30.0, 30.0):
        sched.step(psnr)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_take_a_step(name):
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(load_config(None, [f"optim.name={name}"]), [p])
    p.sum().backward()
    opt.step()
    assert (p < 1).all()
    assert opt.defaults.get("fused") is (True if name != "sgd" else None)  # Adam/AdamW: one kernel, on CPUs too


def test_losses():
    x, y = torch.zeros(4), torch.tensor([0.0, 0.5, -0.5, 1.0])
    assert LOSSES["l1"](x, y) == pytest.approx(0.5)
    assert LOSSES["mse"](x, y) == pytest.approx(0.375)
    assert LOSSES["charbonnier"](x, y) == pytest.approx(0.5, abs=1e-3)  # sqrt(d^2 + eps^2) ~ |d|
    assert LOSSES["charbonnier"](x, x) == pytest.approx(1e-3)


@pytest.mark.parametrize("h, w", [(96, 96), (64, 200)])
def test_the_training_blocking_factor_is_psnrb_s(photo_pair, h, w):
    """The loss's blocking effect factor equals the metric's (on 0..255) on a real JPEG and its
    original, whose blocks it tells apart."""
    from data_pipeline.images import jpeg_roundtrip
    from runtime.metrics.psnrb import blocking_effect_factor as metric_bef

    original = photo_pair[0][100:100 + h, 160:160 + w]
    for img in (jpeg_roundtrip(original, 10), original):
        x = torch.from_numpy(img.astype("float64") / 255)[None, None]
        assert float(blocking_effect_factor(x)) * 255**2 == pytest.approx(metric_bef(img.astype("float64")), rel=1e-9)
    assert metric_bef(jpeg_roundtrip(original, 10).astype("float64")) > 10 * metric_bef(original.astype("float64"))


def test_blocking_weight_adds_the_factor_to_the_loss():
    out, target = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    assert build_loss(load_config(None, ["train.loss=mse"])) is LOSSES["mse"]
    loss = build_loss(load_config(None, ["train.loss=mse", "train.blocking_weight=0.5"]))
    assert float(loss(out, target)) == pytest.approx(float(LOSSES["mse"](out, target) + 0.5 * blocking_effect_factor(out)))
    with pytest.raises(ValueError, match="train.blocking_weight must be 0 or more"):
        load_config(None, ["train.blocking_weight=-1"])


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_autocast_precision(precision, dtype):
    conv = torch.nn.Conv2d(1, 2, 3)
    with autocast_for(precision, torch.device("cpu")):
        assert conv(torch.rand(1, 1, 8, 8)).dtype == dtype


def test_auto_precision_is_bf16_only_where_native():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert [resolve_precision(p, cpu) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]  # explicit wins
    with pytest.raises(ValueError, match="auto, bf16, fp16, fp32, got .fp8."):
        autocast_for("fp8", cpu)


def test_half_precision_asked_for_where_it_is_emulated_is_warned_about(tmp_path, photo_pair, capsys):
    """evaluate --precision bf16 ran 25x slower than fp32 on an AVX2 CPU without a word, and
    --precision fp16 5x slower on LIVE1 on an AVX-512 BF16 EPYC (no fp16 kernels there)."""
    from train.evaluate import main

    cpu = torch.device("cpu")
    assert emulated_precision_warning("fp32", cpu) is None and emulated_precision_warning("auto", cpu) is None
    native = {"bf16": native_bf16(cpu), "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported()}
    Image.fromarray(photo_pair[0][:32, :32]).save(tmp_path / "a.png")
    model = build_model("unet", channels=1, **tiny_kwargs("unet"))
    ckpt.save(ckpt.model_checkpoint(model, "unet", tiny_kwargs("unet"), "gray", {}, {}, 0), tmp_path / "m.pth")
    for precision in ("bf16", "fp16"):
        assert (emulated_precision_warning(precision, cpu) is None) == native[precision]
        assert main(["--dataset", str(tmp_path), "--qualities", "10", "--checkpoint", str(tmp_path / "m.pth"),
                     "--precision", precision]) == 0
        warned = f"warning: {precision} is emulated on this" in capsys.readouterr().err
        assert warned != native[precision]


PAGE_FAULTS = """
import resource, sys, torch
from data_pipeline.system import keep_freed_memory
from runtime.models import build_model
if sys.argv[1] == "keep":
    assert keep_freed_memory()
model, x = build_model("unet", channels=1, width=32, levels=3).eval(), torch.rand(1, 1, 512, 512)
with torch.inference_mode():
    model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x), model(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator: Linux only")
def test_kept_freed_memory_spares_cpu_inference_its_page_faults():
    """glibc gives back every buffer above 32 MiB and the next one faults in afresh: a third of CPU
    inference time was the kernel's. Kept, a 512-px U-Net call reuses its buffers."""
    faults = {how: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS, how], cwd=REPO, capture_output=True,
                                      text=True, check=True).stdout) for how in ("default", "keep")}
    assert faults["keep"] * 10 < faults["default"], faults


def test_self_ensemble_is_equivariant_and_averages_eight_views():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)  # neither rotation- nor flip-invariant
    x = torch.rand(1, 1, 12, 20)
    with torch.no_grad():
        y = self_ensemble(conv, x)
        assert y.shape == x.shape and not torch.allclose(y, conv(x), atol=1e-4)
        turned = self_ensemble(conv, torch.rot90(x, 1, (-2, -1)))
        assert torch.allclose(turned, torch.rot90(y, 1, (-2, -1)), atol=1e-6)
        assert torch.allclose(self_ensemble(conv, x.flip(-2)), y.flip(-2), atol=1e-6)
        # the 8 views of a 3x3 kernel average to one symmetric kernel
        w = conv.weight[0, 0]
        views = [torch.rot90(w, k) for k in range(4)] + [torch.rot90(w.flip(-1), k) for k in range(4)]
        sym = torch.nn.Conv2d(1, 1, 3, padding=1)
        sym.weight.copy_(torch.stack(views).mean(0)[None, None])
        sym.bias.copy_(conv.bias)
        assert torch.allclose(y, sym(x), atol=1e-5)
        # tiled images: the ensemble runs on every tile
        big = torch.rand(1, 1, 40, 70)
        assert torch.allclose(restore_tensor(conv, big, tile=32, overlap=8, ensemble=True),
                              restore_tensor(sym, big, tile=32, overlap=8), atol=1e-5)


def block_edges(t: torch.Tensor) -> torch.Tensor:
    """A probe model: 1 on the rows and columns at the JPEG block edges of its own input, else 0."""
    edge = [((torch.arange(n) % 8 == 0) | (torch.arange(n) % 8 == 7)).float() for n in t.shape[-2:]]
    return torch.maximum(edge[0][:, None], edge[1][None, :]).expand(t.shape)


@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("h, w", [(70, 101), (20, 13), (64, 96)])
def test_tiles_and_turned_views_keep_the_jpeg_block_grid(h, w, ensemble):
    """A model trained on crops on the 8x8 grid must see it there: a last tile starting at
    width - tile, or a flip of a width that is not whole blocks, moved it (5 of LIVE1's 29 images)."""
    x = torch.rand(1, 1, h, w)
    assert torch.allclose(restore_tensor(block_edges, x, tile=64, overlap=16, ensemble=ensemble), block_edges(x), atol=1e-6)


def test_model_checkpoint_round_trip_and_mismatch(tmp_path):
    model = build_model("arcnn", channels=3)
    path = tmp_path / "m.pth"
    ckpt.save(ckpt.model_checkpoint(model, "arcnn", {}, "rgb", {"k": 1}, {"val_psnr": 30.0}, 7), path)
    loaded, meta = ckpt.load_model(path)
    assert meta["arch"] == "arcnn" and meta["step"] == 7 and meta["metrics"]["val_psnr"] == 30.0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ckpt.CheckpointError, match="holds a arcnn model, expected dncnn"):
        ckpt.load_model(path, expect_arch="dncnn")
    blob = torch.load(path, weights_only=True)
    blob["kwargs"] = {"widths": [8, 8, 8]}
    ckpt.save(blob, path)
    with pytest.raises(ckpt.CheckpointError, match="weights do not fit"):
        ckpt.load_model(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_model(path)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_model(tmp_path / "missing.pth")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"checkpoint {tmp_path} is a folder: name the model file")):
        ckpt.load_model(tmp_path)  # was "not found"
    ckpt.save(blob, tmp_path / "image_compression_model.pth")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"is a folder: name the model file ({tmp_path / 'image_compression_model.pth'})")):
        ckpt.load_model(tmp_path)  # a run's output folder


def test_state_files_newest_and_pruned(tmp_path):
    for step in (3, 10, 200):
        ckpt.save({"step": step}, state_path(tmp_path, step))
    assert latest_state(tmp_path).name == "step_00000200.pt"
    prune_states(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010.pt", "step_00000200.pt"]
    assert latest_state(tmp_path / "nothing") is None


def test_macs_per_pixel_of_dncnn():
    # 15 inner 64->64 3x3 convs + 1->64 + 64->1, per pixel
    expected = 15 * 64 * 64 * 9 + 2 * 64 * 9
    assert macs_per_pixel(build_model("dncnn", channels=1), 1) == pytest.approx(expected, rel=0.01)
    assert math.isfinite(macs_per_pixel(build_model("autoencoder", channels=1), 1))


def test_the_benchmark_gives_the_peak_that_mfu_is_a_fraction_of_alone(tmp_path, monkeypatch, capsys):
    """train.compare --peak-tflops wants the training device's measured peak; the benchmark printed it
    only after timing every architecture."""
    from train.benchmark import main

    monkeypatch.chdir(tmp_path)
    assert main(["--peak"]) == 0
    line = capsys.readouterr().out.strip()
    fp32, bf16 = map(float, re.fullmatch(r".+: measured peak (\S+) TFLOP/s fp32, (\S+) TFLOP/s bf16 \(.+\)", line).groups())
    assert fp32 > 0.01 and bf16 > 0.001 and not list(tmp_path.iterdir())  # a timed matmul; no JSON left behind


def test_end_to_end_benchmark_compares_the_trainer_on_real_data_with_the_bare_loop(tiles_dir, tmp_path):
    import json

    from data_pipeline.prepare import split_of

    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "-m", "train.benchmark", "--end-to-end", "--arch", "unet", "--kwargs",
                           "{width = 8, levels = 2}", "--batch", "4", "--patch", "32", "--steps", "4", "--precision", "fp32",
                           "--backends", "resident,torch", "--dataset", str(tiles_dir), "--tile", "128", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["backend"] for r in result["rows"]] == ["resident", "torch"] and result["bare_patches_per_s"] > 0
    # --tile 128: the Trainer trained on 4 tiles of each 160 px training photo, 4 qualities, batch 4
    training_photos = sum(split_of(p.stem, 0.1) == "train" for p in tiles_dir.iterdir())
    assert result["tile"] == 128 and [r["steps_per_epoch"] for r in result["rows"]] == [training_photos * 4 * 4 // 4] * 2
    for r in result["rows"]:
        assert r["trainer_over_bare"] == pytest.approx(r["trainer_patches_per_s"] / result["bare_patches_per_s"])
        assert f"Trainer + {r['backend']}" in proc.stdout


def test_loaders_benchmark_gives_each_loader_the_median_of_its_windows_beside_the_training_step(tiles_dir, tmp_path, monkeypatch, capsys):
    """`train.benchmark --loaders` timed one window of 40 batches per loader: the torch loader's was
    mostly its workers' cold caches (a third of its warm rate on 2 cores)."""
    import json

    from train.benchmark import main

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "train400").symlink_to(tiles_dir)
    monkeypatch.chdir(tmp_path)  # the prepared dataset lands in outputs/ here
    assert main(["--loaders", "--arch", "unet", "--kwargs", "{width = 8, levels = 2}", "--precision", "fp32", "--workers", "1",
                 "--repeats", "2", "--data-root", str(tmp_path / "root"), "--json", "l.json"]) == 0
    result = json.loads((tmp_path / "l.json").read_text())
    assert result["repeats"] == 2 and {r["backend"] for r in result["loaders"]} >= {"resident", "torch"}
    steps = {(s["batch"], s["patch"]): s["train_step_patches_per_s"] for s in result["train_steps"]}
    table = capsys.readouterr().out
    assert "range of 2" in table.splitlines()[1]
    for r in result["loaders"]:
        low, high = r["patches_per_s_range"]
        assert 0 < low <= r["patches_per_s"] <= high and r["x_training"] == pytest.approx(r["patches_per_s"] / steps[r["batch"], r["patch"]])
        assert f" {low:.0f}-{high:.0f}" in table


def test_tiles_and_self_ensemble_take_a_quality_plane_in_and_give_the_image_out():
    """Input planes (image + quality) may outnumber output planes (image): tiled and ensembled alike."""
    net = build_model("unet", channels=1, cond_channels=1, width=8, levels=2).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.cat([torch.rand(1, 1, 40, 70), torch.full((1, 1, 40, 70), 10 / 255)], dim=1)
    with torch.no_grad():
        whole = net(x)
        assert restore_tensor(net, x, tile=32, overlap=8).shape == whole.shape == (1, 1, 40, 70)
        assert restore_tensor(net, x, tile=32, overlap=8, ensemble=True).shape == (1, 1, 40, 70)
        assert torch.allclose(restore_tensor(net, x, tile=128), whole)


@pytest.mark.slow
def test_compiled_training_steps_and_saves_plain_weights(tmp_path):
    """train.compile wraps the training forward in torch.compile; the saved model is the plain module."""
    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    cfg = load_config(None, ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", "data.backend=synthetic", "data.batch_size=2",
                             "data.patch_size=16", "train.max_steps=3", "train.log_every=1", "train.precision=fp32",
                             "train.compile=true", "tracking.enabled=false"])
    trainer = Trainer(cfg, tmp_path, DistInfo(0, 0, 1, torch.device("cpu")))
    try:
        assert isinstance(trainer.step_model, torch._dynamo.eval_frame.OptimizedModule)
        trainer.fit()
    finally:
        trainer.close()
    assert trainer.step == 3 and all(math.isfinite(v) for v in trainer.history["loss"])
    state = torch.load(latest_state(tmp_path / "checkpoints"), weights_only=True, map_location="cpu")
    assert not any(k.startswith("_orig_mod") for k in state["model"])


def test_a_gray_run_starts_from_an_rgb_model_folded_to_luma_and_not_the_reverse(tmp_path):
    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    kwargs = {"width": 4, "levels": 1}
    rgb = build_model("unet", channels=3, **kwargs)
    ckpt.save(ckpt.model_checkpoint(rgb, "unet", kwargs, "rgb", {}, {}, 7), tmp_path / "rgb.pth")
    base = ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", "data.backend=synthetic", "data.patch_size=16",
            "tracking.enabled=false"]
    cpu = DistInfo(0, 0, 1, torch.device("cpu"))
    trainer = Trainer(load_config(None, [*base, "data.mode=gray", f"train.init_from={tmp_path / 'rgb.pth'}"]), tmp_path / "gray", cpu)
    try:
        folded = ckpt.fold_rgb_to_gray(rgb.state_dict(), trainer.model, "rgb.pth")
        assert all(torch.equal(v, folded[k]) for k, v in trainer.model.state_dict().items())
    finally:
        trainer.close()
    ckpt.save(ckpt.model_checkpoint(trainer.model, "unet", kwargs, "gray", {}, {}, 0), tmp_path / "gray.pth")
    with pytest.raises(ckpt.CheckpointError, match="holds a unet gray model"):
        Trainer(load_config(None, [*base, "data.mode=rgb", f"train.init_from={tmp_path / 'gray.pth'}"]), tmp_path / "rgb", cpu)


@pytest.mark.parametrize("film", ["", ", film = true"])
def test_a_run_told_the_quality_starts_from_a_blind_model(tmp_path, film):
    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    kwargs = {"width": 4, "levels": 1}
    blind = build_model("unet", channels=1, **kwargs)
    ckpt.save(ckpt.model_checkpoint(blind, "unet", kwargs, "gray", {}, {}, 7), tmp_path / "blind.pth")
    base = ["model.arch=unet", "data.backend=synthetic", "data.patch_size=16", "tracking.enabled=false",
            f"train.init_from={tmp_path / 'blind.pth'}"]
    cpu = DistInfo(0, 0, 1, torch.device("cpu"))
    trainer = Trainer(load_config(None, [*base, f"model.kwargs={{width = 4, levels = 1, cond_channels = 1{film}}}",
                                         "data.quality_plane=true"]), tmp_path / "told", cpu)
    try:
        widened = ckpt.add_quality_planes(blind.state_dict(), trainer.model, "blind.pth")
        assert all(torch.equal(v, widened[k]) for k, v in trainer.model.state_dict().items())
    finally:
        trainer.close()
    with pytest.raises(ckpt.CheckpointError, match="holds a unet gray model"):  # another width is not a blind twin
        Trainer(load_config(None, [*base, "model.kwargs={width = 8, levels = 1, cond_channels = 1}",
                                   "data.quality_plane=true"]), tmp_path / "other", cpu)


def test_time_budget_waits_for_a_measured_rate_then_fits_the_remaining_time():
    budget = TimeBudget(seconds=100.0, max_steps=10_000)
    assert budget.fit(step=50, elapsed=30.0) is None  # the first window holds the compile
    assert budget.fit(step=100, elapsed=35.0) == 100 + 65 * 10  # 10 steps/s, 65 s left
    assert budget.fit(step=600, elapsed=85.0) == 600 + 15 * 10
    assert budget.fit(step=700, elapsed=101.0) == 700  # out of time: stop now
    capped = TimeBudget(1e6, max_steps=800)
    assert capped.fit(50, 1.0) is None and capped.fit(100, 2.0) == 800  # max_steps stays the bound


def test_a_cosine_end_moved_while_running_still_ends_at_min_lr():
    cfg = load_config(None, ["optim.lr=1e-3", "train.max_steps=100000", "schedule.warmup_steps=10", "schedule.min_lr=1e-5"])
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(cfg, opt)
    ends = {5: 400, 50: 300, 120: 260, 200: 250}  # refits at these steps, as a time budget makes them
    for step in range(1, 251):
        opt.step()
        sched.step()
        if step in ends:
            set_total_steps(sched, ends[step], warmup_steps=10)
        if step == 100:
            assert 1e-4 < opt.param_groups[0]["lr"] < 1e-3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_weight_ema_averages_weights_and_batchnorm_statistics_and_copies_counters():
    from train.loop.ema import WeightEMA

    model = build_model("unet", channels=1, width=4, levels=1, batch_norm=True)
    ema = WeightEMA(model, decay=0.75)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(10) == 0.55 and ema.decay_at(1000) == 0.75  # warm-up, then the decay
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.rand(2, 1, 8, 8)).square().mean().backward()  # moves the BatchNorm statistics too
    opt.step()
    ema.update(step=1000)
    after = model.state_dict()
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * before[k] + 0.25 * after[k], atol=1e-7), k
        else:
            assert torch.equal(v, after[k]), k  # num_batches_tracked
    assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith("running_mean"))
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_with_a_weight_average_the_best_model_is_the_average(tmp_path, tiles_dir):
    from train.loop.distributed import DistInfo
    from train.loop.trainer import SMOKE_OVERRIDES, Trainer

    cfg = load_config(None, [*SMOKE_OVERRIDES, "model.arch=unet", "model.kwargs={width = 4, levels = 1}", "data.backend=torch",
                             f"data.dataset={tiles_dir}", "train.max_steps=2", "train.val_every=2", "train.ema_decay=0.5",
                             "train.precision=fp32", "tracking.enabled=false"])
    trainer = Trainer(cfg, tmp_path, DistInfo(0, 0, 1, torch.device("cpu")))
    try:
        trainer.fit()
    finally:
        trainer.close()
    best = torch.load(tmp_path / "image_compression_model.pth", weights_only=True)["state_dict"]
    average, raw = trainer.ema.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(v, average[k]) for k, v in best.items())
    assert not all(torch.equal(v, raw[k]) for k, v in best.items())
    state = torch.load(latest_state(tmp_path / "checkpoints"), weights_only=True)
    assert all(torch.equal(v, average[k]) for k, v in state["ema"].items())


def test_the_stop_signal_handlers_last_as_long_as_fit(tmp_path, tiles_dir):
    """During fit SIGTERM / SIGINT save a state and stop; after it they are what they were (the
    quickstart took a SIGTERM while evaluating for a stop request and ran on for 12 s)."""
    import signal

    from train.loop.distributed import DistInfo
    from train.loop.trainer import SMOKE_OVERRIDES, Trainer

    cfg = load_config(None, [*SMOKE_OVERRIDES, "model.arch=unet", "model.kwargs={width = 4, levels = 1}", "data.backend=torch",
                             f"data.dataset={tiles_dir}", "train.max_steps=1", "train.precision=fp32", "tracking.enabled=false"])
    trainer = Trainer(cfg, tmp_path, DistInfo(0, 0, 1, torch.device("cpu")))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    during = []

    def step_noting_the_handlers(*batch, step=trainer.train_step):
        during.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return step(*batch)
    trainer.train_step = step_noting_the_handlers
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert during == [(trainer._on_signal, trainer._on_signal)]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_stop_on_a_checkpoint_step_saves_that_state_once(tmp_path, tiles_dir, caplog):
    import logging

    from train.loop.distributed import DistInfo
    from train.loop.trainer import SMOKE_OVERRIDES, Trainer

    cfg = load_config(None, [*SMOKE_OVERRIDES, "model.arch=unet", "model.kwargs={width = 4, levels = 1}", "data.backend=torch",
                             f"data.dataset={tiles_dir}", "train.max_steps=50", "train.ckpt_every=2", "train.val_every=100",
                             "train.precision=fp32", "tracking.enabled=false"])
    trainer = Trainer(cfg, tmp_path, DistInfo(0, 0, 1, torch.device("cpu")))

    def step_then_signal(*batch, step=trainer.train_step):
        if trainer.step == 1:  # as if SIGTERM came during step 2
            trainer.stop_signal = "SIGTERM"
        return step(*batch)
    trainer.train_step = step_then_signal
    with caplog.at_level(logging.INFO, logger="train.loop.trainer"):
        try:
            trainer.fit()
        finally:
            trainer.close()
    saves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved training state")]
    assert saves == ["saved training state at step 2"] and latest_state(tmp_path / "checkpoints").name == "step_00000002.pt"


def test_validation_reports_the_gain_over_the_jpeg_inputs(tiles_prepared):
    """The identity gains exactly 0 dB (what a dead network validates at); a smoothing filter does not."""
    from data_pipeline.config import DataConfig
    from train.loop.distributed import DistInfo
    from train.loop.validation import Validator

    data = DataConfig(prepared_dir=str(tiles_prepared), qualities=[10, 40], limit=3)
    validator = Validator(data, "fp32", LOSSES["l1"], DistInfo(0, 0, 1, torch.device("cpu")))
    identity = validator(torch.nn.Identity())
    assert identity["val_psnr_gain"] == 0.0 and identity["val_psnr"] > 20
    blur = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False, padding_mode="replicate")
    torch.nn.init.constant_(blur.weight, 1 / 9)
    blurred = validator(blur)
    assert blurred["val_psnr_gain"] == pytest.approx(blurred["val_psnr"] - identity["val_psnr"]) and blurred["val_psnr_gain"] != 0


def test_each_rank_holds_its_share_of_the_held_out_images_with_their_jpegs_encoded(tiles_prepared):
    """Every rank decoded every held-out image and kept a decoded JPEG of each at each quality (a
    DIV2K-sized set at four qualities: gigabytes a rank); validation used a quarter of them on 4 ranks."""
    from data_pipeline.config import DataConfig
    from data_pipeline.images import decode_jpeg, jpeg_roundtrip
    from train.loop.validation import held_out_items

    data = DataConfig(prepared_dir=str(tiles_prepared), qualities=[10, 40], limit=5)
    every = held_out_items(data)
    shares = [held_out_items(data, rank, 2) for rank in range(2)]
    assert sorted((n, q) for share in shares for n, q, *_ in share) == sorted((n, q) for n, q, *_ in every)
    assert not {n for n, *_ in shares[0]} & {n for n, *_ in shares[1]}  # each image on one rank, all its qualities
    name, q, jpeg, original = every[-1]
    assert isinstance(jpeg, bytes) and len(jpeg) < original.nbytes / 4
    assert np.array_equal(decode_jpeg(jpeg), jpeg_roundtrip(original, q))


def test_a_flat_held_out_image_of_an_older_prepared_folder_is_passed_over(tiles_prepared, tmp_path, caplog):
    """Preparation skips flat images now; a folder prepared before kept them, and a black frame held
    out made the JPEG inputs' mean PSNR infinite and val_psnr_gain -inf."""
    import json
    import shutil

    from data_pipeline.config import DataConfig
    from data_pipeline.prepare import split_records
    from train.loop.validation import held_out_items

    old = tmp_path / "prepared"
    shutil.copytree(tiles_prepared, old)
    manifest = json.loads((old / "manifest.json").read_text())
    record = split_records(manifest, "val")[0]
    Image.new("L", (record["width"], record["height"])).save(old / record["original"]["path"])  # black, as it was kept
    record["original"]["bytes"] = (old / record["original"]["path"]).stat().st_size
    (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="train.loop.validation"):
        items = held_out_items(DataConfig(prepared_dir=str(old), qualities=[10], limit=3))
    assert [name for name, *_ in items] == [r["name"] for r in split_records(manifest, "val", 3)[1:]]
    assert f"passed over held-out image {record['source']}: flat (every pixel 0)" in caplog.text


def test_validation_scores_in_worker_processes_as_in_process(tiles_prepared):
    """GPU runs score the metrics in a pool of processes: the same figures, and the workers outlive a
    stop signal to the process group (the trainer validates once more after one)."""
    import multiprocessing
    import signal

    from data_pipeline.config import DataConfig
    from data_pipeline.system import usable_cpus
    from train.loop.distributed import DistInfo
    from train.loop.validation import Validator, metric_workers

    cpu = DistInfo(0, 0, 1, torch.device("cpu"))
    assert metric_workers(cpu) == 0
    assert metric_workers(DistInfo(0, 0, 4, torch.device("cuda", 0))) == max(0, min(8, usable_cpus() // 4 - 1))
    data = DataConfig(prepared_dir=str(tiles_prepared), qualities=[10, 40], limit=3)
    blur = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False, padding_mode="replicate")
    torch.nn.init.constant_(blur.weight, 1 / 9)
    expected = Validator(data, "fp32", LOSSES["l1"], cpu, workers=0)(blur)
    before = set(multiprocessing.active_children())
    pooled = Validator(data, "fp32", LOSSES["l1"], cpu, workers=2)
    try:
        assert pooled(blur) == expected
        workers = set(multiprocessing.active_children()) - before
        assert workers
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)
        assert pooled(blur) == expected
    finally:
        pooled.close()


@pytest.mark.parametrize("wall, steps", [(False, 8), (True, 2)])
def test_a_wall_clock_budget_counts_the_time_outside_the_steps(tmp_path, caplog, wall, steps):
    """A run that has spent its 1000 s on validations and checkpoints has nothing left of a wall-clock
    budget (it stops at the first refit, on the second log window) and all of a steps budget. Before
    that refit its step count is unknown: the first line said step 1/<train.max_steps>, eta hours away."""
    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    overrides = ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", "data.backend=synthetic", "data.batch_size=2",
                 "data.patch_size=16", "train.log_every=1", "train.precision=fp32", "tracking.enabled=false",
                 "train.max_steps=8", "train.time_budget_s=1000", f"train.time_budget_wall={str(wall).lower()}"]
    trainer = Trainer(load_config(None, overrides), tmp_path, DistInfo(0, 0, 1, torch.device("cpu")))
    trainer.wall_time = 1000.0  # as if resumed from such a run
    try:
        with caplog.at_level("INFO", logger="train.loop.trainer"):
            trainer.fit()
    finally:
        trainer.close()
    assert trainer.step == steps
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0].startswith("step 1/? ") and lines[0].endswith(" eta ?") and lines[1].startswith(f"step 2/{steps} "), lines


def test_a_resumed_run_names_the_settings_it_changed(tmp_path, caplog):
    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    base = ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", "data.backend=synthetic", "data.batch_size=2",
            "data.patch_size=16", "train.log_every=1", "train.precision=fp32", "tracking.enabled=false"]
    cpu = DistInfo(0, 0, 1, torch.device("cpu"))
    caplog.set_level("INFO", logger="train.loop.trainer")
    for steps, extra in ((2, []), (4, ["optim.grad_clip=1.0"])):
        trainer = Trainer(load_config(None, base + [f"train.max_steps={steps}", *extra]), tmp_path, cpu, resume=True)
        try:
            trainer.fit()
        finally:
            trainer.close()
    assert trainer.step == 4 and trainer.resume_changes == "optim.grad_clip: 0.0 -> 1.0, train.max_steps: 2 -> 4"
    assert "resumed with changed settings: optim.grad_clip: 0.0 -> 1.0, train.max_steps: 2 -> 4" in caplog.text


def _on_two_gloo_ranks(target, arg) -> dict:
    """{rank: result} of target(rank, port, arg, results) in two spawned processes, which put (rank, result)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, arg, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    return got


def _raise_on(ranks: tuple, rank: int):
    from data_pipeline.errors import UserError

    if rank in ranks:
        raise UserError("bad checkpoint")
    return rank


def _rank_outcomes(rank: int, port: int, failing: tuple, results) -> None:
    import torch.distributed as dist

    from data_pipeline.errors import ReportedElsewhere, UserError
    from train.loop.distributed import DistInfo, on_every_rank, on_main_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank, rank, 2, torch.device("cpu"))
    outcomes = []
    for helper in (on_every_rank, on_main_rank):
        try:
            outcomes.append(("ok", helper(lambda: _raise_on(failing, rank), info)))
        except ReportedElsewhere as exc:
            outcomes.append(("silent", str(exc)))
        except UserError as exc:
            outcomes.append(("printed", str(exc)))
    results.put((rank, outcomes))
    dist.destroy_process_group()


@pytest.mark.parametrize("failing, every_rank, main_rank", [
    ((0, 1), [("printed", "bad checkpoint"), ("silent", "2 of 2 ranks: bad checkpoint")],
     [("printed", "bad checkpoint"), ("silent", "rank 0: bad checkpoint")]),
    ((1,), [("silent", "1 of 2 ranks: bad checkpoint"), ("printed", "bad checkpoint")],
     [("ok", 0), ("ok", None)]),  # on_main_rank runs on rank 0 only
    ((), [("ok", 0), ("ok", 1)], [("ok", 0), ("ok", None)]),
])
def test_a_user_error_on_some_ranks_is_printed_once_and_stops_them_all(failing, every_rank, main_rank):
    """Two real gloo processes: the lowest rank that failed prints, every other rank stops silently."""
    got = _on_two_gloo_ranks(_rank_outcomes, failing)
    assert [got[r][0] for r in (0, 1)] == every_rank
    assert [got[r][1] for r in (0, 1)] == main_rank


def test_the_step_line_shows_no_psnr_before_a_validation_and_a_resumed_runs_last(caplog):
    """'val_psnr nan' before the first validation read as a diverged run; a resumed run showed it
    until its next validation."""
    from runtime.metrics import metrics
    from train.loop.progress import Progress

    step = {"train_loss": 0.02, "lr": 1e-3, "images_per_s": 100.0, "data_wait_s": 0.0}
    validation = {**{f"val_{m.name}": 0.5 for m in metrics()}, "val_psnr": 30.5, "val_loss": 0.02,
                  "val_psnr_gain": 1.0, "val_time_s": 1.0}
    with caplog.at_level("INFO", logger="train.loop.trainer"):
        fresh, resumed = Progress(True, 10, 0), Progress(True, 10, 4, last_psnr=31.25)
        fresh.update(1, step)
        resumed.update(5, step)
        fresh.validated(2, validation)
        fresh.update(3, step)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" val_psnr ")[1].split()[0] for line in lines] == ["-", "31.25", "30.50"], lines


def test_a_run_imports_dali_only_where_its_loader_is_dali():
    """Every run's tags named DALI's version, imported for that alone where the loader was torch's
    or the resident one: 0.3 s and 66 MB of rank 0's process."""
    from data_pipeline.loaders import dali_available

    code = ("import sys, torch\nfrom train.loop.tracking import system_tags\n"
            "for loader in ('torch', 'dali'):\n"
            "    print(loader, 'dali' in system_tags(torch.device('cpu'), 1, 'fp32', loader), 'nvidia.dali' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.stdout == f"torch False False\ndali {dali_available()} {dali_available()}\n", proc.stderr[-2000:]


def _trained_weights(out: Path, prepared: Path, batch: int, accum: int, steps: int = 3, resume: bool = False,
                     backend: str = "resident") -> dict:
    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    cfg = load_config(None, ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", f"data.prepared_dir={prepared}",
                             f"data.backend={backend}", "data.qualities=[10, 40]", "data.patch_size=32", f"data.batch_size={batch}",
                             f"train.grad_accum_steps={accum}", f"train.max_steps={steps}", "train.val_every=100", "train.precision=fp32",
                             "optim.name=sgd", "optim.lr=0.5", "schedule.name=constant", "tracking.enabled=false"])
    trainer = Trainer(cfg, out, DistInfo(0, 0, 1, torch.device("cpu")), resume=resume)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer.model.state_dict()


def test_closing_a_trainer_ends_its_loader_workers(tmp_path, tiles_prepared):
    """The torch loader's workers stay between epochs: left to the garbage collector (a Trainer sits in
    reference cycles), one collection inside another thread's import waited 5 s for each, 30 s in the
    middle of an unrelated test. Trainer.close() ends them."""
    import multiprocessing

    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    cfg = load_config(None, ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", f"data.prepared_dir={tiles_prepared}",
                             "data.backend=torch", "data.workers=2", "data.qualities=[10]", "data.patch_size=32", "data.batch_size=4",
                             "train.max_steps=2", "train.val_every=100", "tracking.enabled=false"])
    before = set(multiprocessing.active_children())
    trainer = Trainer(cfg, tmp_path / "out", DistInfo(0, 0, 1, torch.device("cpu")))
    try:
        trainer.fit()
        started = set(multiprocessing.active_children()) - before
    finally:
        trainer.close()
    assert len(started) >= 2 and not [w for w in started if w.is_alive()]


def test_a_step_of_accumulated_micro_batches_is_a_step_of_them_all_at_once(tmp_path, tiles_prepared):
    """The resident loader gives batch 8 the patches of batch 4's two next batches, so 4 x 2
    accumulated steps as 8; 4 x 1 (half the patches) does not."""
    whole, accumulated, half = (_trained_weights(tmp_path / f"b{b}x{k}", tiles_prepared, b, k) for b, k in ((8, 1), (4, 2), (4, 1)))
    assert all(torch.allclose(v, accumulated[k], atol=1e-6) for k, v in whole.items())
    assert not all(torch.allclose(v, half[k], atol=1e-3) for k, v in whole.items())


@pytest.mark.parametrize("backend", ["resident", "torch"])
def test_a_run_resumed_with_smaller_batches_continues_the_epoch_where_it_stood(tmp_path, tiles_prepared, backend):
    """A step of batch 8 resumed as batch 4 x 2 micro-batches: the loader goes on at the 9th patch of
    the epoch (its third batch of 4), so the run ends with the weights of 3 steps of batch 8."""
    whole = _trained_weights(tmp_path / "whole", tiles_prepared, 8, 1, backend=backend)
    _trained_weights(tmp_path / "split", tiles_prepared, 8, 1, steps=1, backend=backend)
    resumed = _trained_weights(tmp_path / "split", tiles_prepared, 4, 2, resume=True, backend=backend)
    assert all(torch.allclose(v, resumed[k], atol=1e-6) for k, v in whole.items())


def test_a_resumed_position_between_two_batches_says_what_comes_again(tmp_path, tiles_prepared, caplog):
    import logging

    _trained_weights(tmp_path, tiles_prepared, 8, 1, steps=1)
    with caplog.at_level(logging.INFO, logger="train.loop.trainer"):
        _trained_weights(tmp_path, tiles_prepared, 3, 1, steps=2, resume=True)
    said = [r.getMessage() for r in caplog.records]
    assert "the run took 8 patches of epoch 0, not a whole number of this run's 3-patch batches (1 ranks x data.batch_size 3): " \
           "the last 2 come again" in said, said
    assert any(m.startswith("resumed from ") and m.endswith("at step 1 (epoch 0, batch 2)") for m in said), said


def test_more_micro_batches_than_an_epoch_holds_is_one_line(tmp_path, tiles_prepared):
    with pytest.raises(ValueError, match=r"fewer than the 1000 micro-batches of a step \(train.grad_accum_steps\)"):
        _trained_weights(tmp_path, tiles_prepared, 4, 1000)


def test_profiled_steps_leave_a_trace_and_a_table_in_the_run(tmp_path, tiles_prepared):
    import json

    import mlflow

    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", f"data.prepared_dir={tiles_prepared}",
                             "data.backend=resident", "data.qualities=[10, 40]", "data.patch_size=32", "data.batch_size=4",
                             "train.max_steps=5", "train.val_every=100", "train.profile_steps=2", f"tracking.tracking_uri={store}"])
    trainer = Trainer(cfg, tmp_path / "out", DistInfo(0, 0, 1, torch.device("cpu")))
    try:
        trainer.fit()
    finally:
        trainer.close()
    profile = tmp_path / "out" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["rank0_steps_3-4.json", "rank0_steps_3-4.txt"]  # steps 1-2 passed over
    events = {e.get("name") for e in json.loads((profile / "rank0_steps_3-4.json").read_text())["traceEvents"]}
    assert {"ProfilerStep#3", "ProfilerStep#4"} <= events and "ProfilerStep#5" not in events and "aten::convolution_backward" in events
    assert "aten::convolution_backward" in (profile / "rank0_steps_3-4.txt").read_text()
    artifacts = mlflow.MlflowClient(store).list_artifacts(trainer.tracker.run_id, "profile")
    assert [a.path for a in artifacts] == ["profile/rank0_steps_3-4.txt"]


def test_a_run_without_gains_stops_early_as_a_finished_run_and_a_resume_keeps_to_it(tmp_path, tiles_prepared, caplog):
    """At a learning rate that changes nothing, no validation beats the first by 0.5 dB: patience 2
    ends the run after the third of ten validations, finished, with its best model; a resume with the
    same patience ends at once, one with patience 4 goes on to the fifth."""
    import logging

    import mlflow

    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    store = f"sqlite:///{tmp_path}/mlflow.db"

    def fit(patience: int, resume: bool) -> Trainer:
        cfg = load_config(None, ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", f"data.prepared_dir={tiles_prepared}",
                                 "data.backend=resident", "data.qualities=[10, 40]", "data.patch_size=32", "data.batch_size=4",
                                 "optim.lr=1e-9", "train.max_steps=10", "train.val_every=1", "train.ckpt_every=100",
                                 f"train.early_stop_patience={patience}", "train.early_stop_min_db=0.5", f"tracking.tracking_uri={store}"])
        trainer = Trainer(cfg, tmp_path / "out", DistInfo(0, 0, 1, torch.device("cpu")), resume=resume)
        try:
            trainer.fit()
        finally:
            trainer.close()
        return trainer

    with caplog.at_level(logging.INFO, logger="train.loop.trainer"):
        first = fit(2, False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("early stop")]
    assert first.finished and first.step == 3 and len(first.history["val_psnr"]) == 3, said
    assert said == [f"early stop at step 3: 2 validations without a validation PSNR above {first.history['val_psnr'][0]:.3f} dB "
                    "by more than 0.5 dB (train.early_stop_patience)"]
    run = mlflow.MlflowClient(store).get_run(first.tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["early_stopped_at_step"] == "3"
    saved = torch.load(latest_state(tmp_path / "out" / "checkpoints"), weights_only=True)
    assert (tmp_path / "out" / "image_compression_model.pth").is_file() and saved["step"] == 3
    again = fit(2, True)
    assert again.finished and again.step == 3 and len(again.history["val_psnr"]) == 3
    longer = fit(4, True)
    assert longer.finished and longer.step == 5 and len(longer.history["val_psnr"]) == 5


def test_a_trace_of_steps_profiled_before_is_kept(tmp_path):
    """A run resumed from an earlier state steps through the same steps again: a second trace."""
    from train.loop.profiling import StepProfiler

    step = [0]
    for _ in range(2):
        step[0] = 0
        profiler = StepProfiler(1, tmp_path, 0, torch.device("cpu"), lambda: step[0])
        for _ in range(3):
            torch.ones(4).sum()
            step[0] += 1
            profiler.step()
        profiler.close()
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == [
        "rank0_steps_3-3-2.json", "rank0_steps_3-3-2.txt", "rank0_steps_3-3.json", "rank0_steps_3-3.txt"]


def _count_all_reduces(rank: int, port: int, out: Path, results) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from train.loop.distributed import DistInfo
    from train.loop.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config(None, ["model.arch=unet", "model.kwargs={width = 4, levels = 1}", "data.backend=synthetic", "data.batch_size=2",
                             "data.patch_size=16", "train.grad_accum_steps=2", "train.max_steps=3", "train.precision=fp32",
                             "tracking.enabled=false"])
    trainer = Trainer(cfg, out, DistInfo(rank, rank, 2, torch.device("cpu")))
    calls = []

    def counted(state, bucket):  # DDP's own all-reduce, counted
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)
    trainer.ddp_model.register_comm_hook(None, counted)
    try:
        trainer.fit()
    finally:
        trainer.close()
    results.put((rank, len(calls)))
    dist.destroy_process_group()


def test_accumulating_ranks_all_reduce_their_gradients_once_a_step(tmp_path):
    """Two real gloo processes, 3 steps of 2 micro-batches: one all-reduce (one bucket) a step, not one a micro-batch."""
    assert _on_two_gloo_ranks(_count_all_reduces, tmp_path) == {0: 3, 1: 3}
