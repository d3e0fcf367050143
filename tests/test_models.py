import pytest
import torch
from torch import nn

from runtime.models import TINY, architectures, build_model, build_problem, check_kwargs, macs_per_pixel, tiny_kwargs

STEM = ("unet", {**tiny_kwargs("unet"), "unshuffle": 2})  # the tiny U-Net behind a pixel-unshuffle stem


def test_registry_lists_and_rejects():
    assert architectures() == sorted(TINY) and {"autoencoder", "arcnn", "dncnn", "unet", "attention"} <= set(TINY)
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        build_model("nope")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", architectures())
def test_output_shape_equals_input_shape_on_odd_sizes(arch, channels):
    torch.manual_seed(0)
    model = build_model(arch, channels=channels, **TINY[arch]).eval()
    for h, w in [(33, 47), (8, 9)]:
        x = torch.rand(2, channels, h, w)
        with torch.no_grad():
            y = model(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_autoencoder_tiling_reproduces_whole_tiles_and_blends_seams():
    torch.manual_seed(0)
    model = build_model("autoencoder", **TINY["autoencoder"]).eval()
    x = torch.rand(1, 1, 32, 80)
    with torch.no_grad():
        whole = model(x)
        left, right = model.forward_tile(x[..., :32]), model.forward_tile(x[..., -32:])
    # columns covered by one tile only equal that tile's output exactly
    assert torch.allclose(whole[..., :20], left[..., :20], atol=1e-6)
    assert torch.allclose(whole[..., -20:], right[..., -20:], atol=1e-6)
    assert model.compression_ratio() == 32 * 32 / 32


def test_bad_kwargs_are_clear():
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth"):
        build_model("autoencoder", tile=30, depth=2)
    with pytest.raises(ValueError, match="unknown activation 'tanhh'"):
        build_model("autoencoder", act="tanhh")


@pytest.mark.parametrize("arch, kwargs", [("dncnn", {}), ("unet", {}), ("attention", {}), ("arcnn", {"residual": True}),
                                          ("drunet", tiny_kwargs("drunet")), ("nafnet", tiny_kwargs("nafnet")),
                                          ("restormer", tiny_kwargs("restormer"))])
def test_untrained_residual_models_start_as_the_identity(arch, kwargs):
    """The residual branch's last layer starts at zero: training starts from the JPEG input."""
    x = torch.rand(2, 1, 24, 40)
    assert torch.equal(build_model(arch, channels=1, **kwargs).eval()(x), x)


def test_unet_ablation_switches_change_the_graph():
    full = build_model("unet", width=8, levels=2)
    no_skips = build_model("unet", width=8, levels=2, skips=False)
    assert sum(p.numel() for p in no_skips.parameters()) < sum(p.numel() for p in full.parameters())
    plain = build_model("unet", width=8, levels=2, residual=False).eval()
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(full.eval()(x), x)  # residual + zero-initialised head: identity at start
        assert not torch.allclose(plain(x), x, atol=0.05)  # no residual: the net must learn the image itself
        assert no_skips.eval()(x).shape == x.shape


def test_a_pixel_unshuffle_stem_runs_the_unet_on_sub_images_for_the_macs_of_half_the_width():
    """unshuffle = 2: the body reads the 4 sub-images of each plane at half the resolution, so twice
    the width costs what the plain U-Net does per pixel; sizes pad to the stem times the levels."""
    plain, stem = build_model("unet", width=8, levels=2), build_model("unet", width=16, levels=2, unshuffle=2).eval()
    assert stem.size_multiple == 8 and stem.down[0][0].in_channels == 4 and stem.head.out_channels == 4
    assert macs_per_pixel(stem, 1) == pytest.approx(macs_per_pixel(plain, 1), rel=0.02)
    x = torch.rand(2, 1, 19, 29)
    with torch.no_grad():
        assert torch.equal(stem(x), x)  # zero-initialised head: the identity at the start
        nn.init.normal_(stem.head.weight, std=0.1)
        y = stem(x)
        assert y.shape == x.shape and not torch.allclose(y, x, atol=1e-3)
    film = build_model("unet", channels=3, width=16, levels=2, unshuffle=2, cond_channels=1, film=True).eval()
    x = torch.rand(2, 4, 19, 29)  # FiLM reads the quality plane before the stem: only the image is unshuffled
    with torch.no_grad():
        assert film.down[0][0].in_channels == 12 and torch.equal(film(x), x[:, :3])
        for p in film.parameters():
            nn.init.normal_(p, std=0.1)
        assert not torch.allclose(film(x), film(torch.cat([x[:, :3], torch.zeros_like(x[:, 3:])], 1)))
    assert build_problem("unet", {"unshuffle": 0}) == "unet(unshuffle=0) cannot be built: unet: unshuffle must be at least 1, got 0"


def test_unet_dropout_acts_in_training_only_and_keeps_the_weights():
    torch.manual_seed(0)
    net = build_model("unet", width=8, levels=2, dropout=0.5)
    assert net.state_dict().keys() == build_model("unet", width=8, levels=2).state_dict().keys()
    nn.init.normal_(net.head.weight)  # a non-zero head, so the bottleneck reaches the output
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert not torch.equal(net.train()(x), net(x))
        assert torch.equal(net.eval()(x), net(x))


def test_kwargs_are_checked_against_the_signature():
    assert check_kwargs("unet", {"width": 8, "batch_norm": True}) is None
    assert "width must be of type int" in check_kwargs("unet", {"width": "wide"})
    assert "depthh is not an argument of dncnn" in check_kwargs("dncnn", {"depthh": 3})
    assert check_kwargs("arcnn", {"widths": [8, 8, 4]}) is None  # a TOML list for a tuple default
    assert check_kwargs("unet", {"dropout": 1}) is None  # an int where a float is expected
    assert check_kwargs("nafnet", {"enc_blocks": [2, -1]}) == "enc_blocks must be 0 or more, got [2, -1]"


def test_impossible_kwargs_are_found_on_the_meta_device():
    assert build_problem("unet", {"width": 8}, channels=3) is None
    assert build_problem("unet", {"width": 20000, "levels": 6}) is None  # nothing allocated
    assert build_problem("restormer", {"width": 50, "heads": 4}).startswith(
        "restormer(width=50, heads=4) cannot be built: restormer: heads must be at least 1 and divide the width 50, got 4")
    assert build_problem("drunet", {"levels": 0}) == "drunet(levels=0) cannot be built: drunet: levels must be at least 1, got 0"
    assert build_problem("unet", {"width": 0}).endswith("layer down.0.0.weight would be empty (a width or count of 0)")


@pytest.mark.parametrize("arch", architectures())
def test_every_architecture_learns_and_keeps_odd_sizes(arch):
    """A few optimizer steps on a real-valued target move the output away from the identity."""
    torch.manual_seed(0)
    net = build_model(arch, channels=1, **tiny_kwargs(arch))
    x, target = torch.rand(2, 1, 24, 40), torch.rand(2, 1, 24, 40)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for _ in range(5):
        loss = torch.nn.functional.l1_loss(net(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert torch.nn.functional.l1_loss(net(x), target).item() < first
        assert net.eval()(torch.rand(1, 1, 19, 29)).shape == (1, 1, 19, 29)


# the architectures with a quality plane, as the tests build them (the U-Net with a pixel-unshuffle stem too)
CONDITIONED = [(arch, tiny_kwargs(arch)) for arch in ("unet", "drunet", "nafnet", "dncnn")] + [STEM]


@pytest.mark.parametrize("arch, kwargs", CONDITIONED)
def test_a_quality_plane_is_an_extra_input_and_the_output_keeps_the_image_channels(arch, kwargs):
    net = build_model(arch, channels=3, cond_channels=1, **kwargs).eval()
    x = torch.rand(2, 4, 24, 40)
    with torch.no_grad():
        assert torch.equal(net(x), x[:, :3])  # zero-initialised head: the identity on the image
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        a, b = net(x), net(torch.cat([x[:, :3], torch.zeros_like(x[:, 3:])], 1))
    assert a.shape == (2, 3, 24, 40) and not torch.allclose(a, b)  # the plane reaches the output


@pytest.mark.parametrize("arch, kwargs", CONDITIONED)
def test_a_blind_model_widened_for_the_quality_plane_starts_as_the_blind_model(arch, kwargs):
    """train.init_from of a blind model in a run told the quality: whatever the plane says, the
    widened network computes what the blind one did, until training gives the plane weight."""
    from runtime.checkpoint import CheckpointError, add_quality_planes

    torch.manual_seed(0)
    blind = build_model(arch, channels=3, **kwargs).eval()
    told = build_model(arch, channels=3, cond_channels=1, **kwargs).eval()
    with torch.no_grad():
        for p in blind.parameters():
            p.add_(0.05 * torch.randn_like(p))
    told.load_state_dict(add_quality_planes(blind.state_dict(), told, "blind.pth"))
    x = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        assert not torch.allclose(blind(x), x, atol=1e-3)  # not the identity's check
        for q in (0.0, 0.04, 0.16):
            assert torch.allclose(told(torch.cat([x, torch.full_like(x[:, :1], q)], 1)), blind(x), atol=1e-6)
    with pytest.raises(CheckpointError, match="cannot add quality planes"):
        add_quality_planes(blind.state_dict(), build_model(arch, channels=1, cond_channels=1, **kwargs), "blind.pth")


@pytest.mark.parametrize("arch,kwargs", [("unet", {"width": 8, "levels": 2, "batch_norm": True}),
                                         ("nafnet", {"width": 8, "enc_blocks": [1, 1], "middle_blocks": 1})])
def test_a_film_model_reads_the_quality_from_the_plane_and_starts_as_its_blind_twin(tmp_path, arch, kwargs):
    """film = true: the quality modulates every block instead of entering as pixels; widened from a
    blind model it computes what that model did, whatever the quality, until training moves FiLM."""
    import numpy as np
    import onnxruntime as ort

    from export.onnx_export import export_onnx
    from runtime import checkpoint as ckpt

    with pytest.raises(ValueError, match="needs cond_channels"):
        build_model(arch, film=True)
    torch.manual_seed(0)
    blind = build_model(arch, **kwargs).eval()
    film = build_model(arch, cond_channels=1, film=True, **kwargs).eval()
    with torch.no_grad():
        for p in blind.parameters():
            p.add_(0.05 * torch.randn_like(p))
    film.load_state_dict(ckpt.add_quality_planes(blind.state_dict(), film, "blind.pth"))
    x = torch.rand(2, 1, 24, 40)
    told = {q: torch.cat([x, torch.full_like(x, q)], 1) for q in (0.0, 0.04, 0.16)}
    with torch.no_grad():
        assert not torch.allclose(blind(x), x, atol=1e-3)
        assert all(torch.allclose(film(t), blind(x), atol=1e-6) for t in told.values())
        for p in film.film.parameters():
            torch.nn.init.normal_(p, std=0.1)
        assert not torch.allclose(film(told[0.04]), film(told[0.16]), atol=1e-4)
    kwargs = {**kwargs, "cond_channels": 1, "film": True}
    ckpt.save(ckpt.model_checkpoint(film, arch, kwargs, "gray", {}, {}, 0), tmp_path / "film.pth")
    export_onnx(tmp_path / "film.pth", tmp_path / "film.onnx")  # the plane stays part of the input
    session = ort.InferenceSession(str(tmp_path / "film.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = film(told[0.16]).numpy()
    assert np.abs(session.run(None, {"input": told[0.16].numpy()})[0] - want).max() < 1e-4


@pytest.mark.parametrize("arch, kwargs", [(arch, TINY[arch]) for arch in architectures()] + [STEM])
def test_an_rgb_model_folds_into_the_gray_model_that_restores_its_luma(arch, kwargs):
    """train.init_from of an RGB model in a gray run: the gray network computes, for a gray image,
    the BT.601 luma of what the RGB network makes of that image (R = G = B)."""
    from runtime.checkpoint import CheckpointError, fold_rgb_to_gray

    torch.manual_seed(0)
    rgb, gray = (build_model(arch, channels=c, **kwargs).eval() for c in (3, 1))
    with torch.no_grad():
        for p in rgb.parameters():  # leave the zero-initialised last layers' identity start
            p.add_(0.05 * torch.randn_like(p))
    try:
        gray.load_state_dict(fold_rgb_to_gray(rgb.state_dict(), gray, "rgb.pth"))
    except CheckpointError as exc:
        assert arch == "autoencoder" and "cannot fold" in str(exc)  # dense layers over flattened tiles
        return
    y = torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        expected = torch.tensordot(torch.tensor([0.299, 0.587, 0.114]), rgb(y.expand(-1, 3, -1, -1)), dims=([0], [1]))
        assert torch.allclose(gray(y)[:, 0], expected, atol=1e-5)
        assert not torch.allclose(gray(y), y, atol=1e-3)  # the check is not the identity's


@pytest.mark.parametrize("arch", architectures())
def test_every_architecture_computes_the_same_in_channels_last(arch):
    """Training and CPU inference store tensors channels_last, where some layers take another path
    (NAFNet's and Restormer's LayerNorm: torch's fused layer_norm): same output and gradients."""
    torch.manual_seed(0)
    nchw = build_model(arch, channels=3, **tiny_kwargs(arch))
    with torch.no_grad():
        for p in nchw.parameters():  # leave the zero-initialised last layers' identity start
            p.add_(0.05 * torch.randn_like(p))
    nhwc = build_model(arch, channels=3, **tiny_kwargs(arch)).to(memory_format=torch.channels_last)
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.rand(2, 3, 32, 48)
    outputs = [net(x.contiguous(memory_format=fmt)) for net, fmt in ((nchw, torch.contiguous_format), (nhwc, torch.channels_last))]
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[0], x, atol=1e-3)  # the check is not the identity's
    for out in outputs:
        out.square().mean().backward()
    for (name, a), b in zip(nchw.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["unet", "dncnn", "autoencoder"])
def test_batch_norm_folded_for_inference_computes_the_same_without_it(arch):
    from runtime.models import fold_batch_norm

    torch.manual_seed(0)
    model = build_model(arch, **{**TINY[arch], "batch_norm": True})
    for m in model.modules():  # trained-looking statistics and affine terms: folding them must matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = model.eval()(x)
        folded = fold_batch_norm(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(x), want, atol=1e-5) and not folded.training


def test_the_inference_paths_run_the_model_folded_in_fp32(tmp_path):
    from runtime import checkpoint as ckpt
    from runtime.inference import Restorer
    from runtime.runners.torch_eager import TorchRunner

    model = build_model("unet", **TINY["unet"], batch_norm=True)
    path = tmp_path / "model.pth"
    ckpt.save(ckpt.model_checkpoint(model, "unet", {**TINY["unet"], "batch_norm": True}, "gray", {}, {}, 1), path)
    for precision, folded in (("fp32", True), ("bf16", False)):  # bf16 would round the folded shift
        for runner in (Restorer(path, precision=precision), TorchRunner.open(path, precision=precision)):
            assert any(isinstance(m, nn.BatchNorm2d) for m in runner.model.modules()) != folded
