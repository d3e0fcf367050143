import numpy as np
import pytest
import torch

from data_pipeline.images import jpeg_roundtrip
from runtime.inference import to_uint8
from runtime.metrics.psnr import psnr
from runtime.metrics.psnrb import blocking_effect_factor, psnrb


def test_color_psnr_is_one_mse_over_all_channels(photo_pair):
    img = photo_pair[1]
    out = jpeg_roundtrip(img, 10)
    mse = np.mean((img.astype(float) - out) ** 2)
    assert psnr(img, out) == pytest.approx(10 * np.log10(255**2 / mse))


def test_bef_sees_blocks_and_not_smooth_ramps():
    ramp = np.tile(np.linspace(0, 255, 64), (64, 1))
    blocks = np.kron(np.arange(64).reshape(8, 8) * 4.0, np.ones((8, 8)))
    assert blocking_effect_factor(ramp) == 0.0
    assert blocking_effect_factor(blocks) > 10


def test_psnrb_penalises_jpeg_blocking(photo_pair):
    img = photo_pair[0]
    out = jpeg_roundtrip(img, 10)
    assert psnrb(img, out) < psnr(img, out) - 1.0  # q10 is visibly blocky


def test_to_uint8_rounds_and_clips():
    t = torch.tensor([[[[-0.1, 0.5, 1.2, 0.999]]]])
    assert to_uint8(t[0]).tolist() == [[0, 128, 255, 255]]


@pytest.mark.parametrize("band_pixels", [512, 512 * 7, 512 * 100, 1 << 18])  # a row a band, a few, two, one
def test_ssim_in_bands_is_scikit_images_ssim_of_the_whole_image(photo_pair, monkeypatch, band_pixels):
    from skimage.metrics import structural_similarity

    from runtime.metrics import ssim as ssim_module
    monkeypatch.setattr(ssim_module, "BAND_PIXELS", band_pixels)
    for img in photo_pair:
        out = jpeg_roundtrip(img, 10)
        whole = structural_similarity(img, out, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255, channel_axis=-1 if img.ndim == 3 else None)
        assert ssim_module.ssim(img, out) == pytest.approx(whole, rel=1e-13, abs=0)


def test_ssim_of_a_large_photo_takes_band_sized_buffers(photo_pair):
    """scikit-image's SSIM holds a dozen float64 copies of the image: 1.5 GB for a 12 MP RGB photo in
    each metric worker of evaluate and validation."""
    import tracemalloc

    from runtime.metrics.ssim import BAND_PIXELS, RADIUS, ssim
    img = np.tile(photo_pair[0], (4, 3))  # 2048 x 1536: 11 bands
    out = jpeg_roundtrip(img, 10)
    tracemalloc.start()
    try:
        ssim(img, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    band = 8 * (BAND_PIXELS // img.shape[1] + 2 * RADIUS) * img.shape[1]  # bytes of one float64 band
    assert peak < 20 * band, f"{peak / band:.1f} float64 bands"  # the whole image's dozen: 170
