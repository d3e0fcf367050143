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


@pytest.mark.filterwarnings("error")
def test_identical_images_score_without_a_warning(photo_pair):
    """A model that returns its input, validated on an image whose JPEG is exact and that has no
    blocking: PSNR-B printed numpy's divide-by-zero warning (once per worker, among the log lines)."""
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    assert psnr(ramp, ramp) == psnrb(ramp, ramp) == float("inf")
    img = photo_pair[0]  # itself a JPEG once: blocky, so PSNR-B stays finite
    assert psnr(img, img) == float("inf") and 30 < psnrb(img, img) < float("inf")


def test_psnrb_penalises_jpeg_blocking(photo_pair):
    img = photo_pair[0]
    out = jpeg_roundtrip(img, 10)
    assert psnrb(img, out) < psnr(img, out) - 1.0  # q10 is visibly blocky


def test_to_uint8_rounds_and_clips():
    t = torch.tensor([[[[-0.1, 0.5, 1.2, 0.999]]]])
    assert to_uint8(t[0]).tolist() == [[0, 128, 255, 255]]


@pytest.mark.parametrize("band_pixels", [512, 512 * 7, 512 * 100, 1 << 18])  # a row a band, a few, two, one
def test_metrics_in_bands_are_those_of_the_whole_image(photo_pair, monkeypatch, band_pixels):
    """PSNR to the last bit (its sums are exact integers), PSNR-B likewise against its one-band sums,
    SSIM to the 13th digit (each pixel's map value is the whole image's; the sum's order differs)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    import runtime.metrics
    from runtime.metrics.ssim import ssim
    for img in photo_pair:
        out = jpeg_roundtrip(img, 10)
        whole = {"psnr": peak_signal_noise_ratio(img, out, data_range=255), "psnrb": psnrb(img, out),
                 "ssim": structural_similarity(img, out, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                               data_range=255, channel_axis=-1 if img.ndim == 3 else None)}
        monkeypatch.setattr(runtime.metrics, "BAND_PIXELS", band_pixels)
        assert psnr(img, out) == whole["psnr"] and psnrb(img, out) == whole["psnrb"]
        assert ssim(img, out) == pytest.approx(whole["ssim"], rel=1e-13, abs=0)
        monkeypatch.undo()


def test_the_metrics_of_a_large_photo_take_band_sized_buffers(photo_pair):
    """scikit-image's SSIM holds a dozen float64 copies of the image (1.5 GB for a 12 MP RGB photo),
    its PSNR and our PSNR-B three (0.8 GB), in each process that scores for evaluate and validation."""
    import tracemalloc

    from runtime.metrics import BAND_PIXELS, image_metrics
    img = np.tile(photo_pair[1], (4, 3, 1))  # 2048 x 1536 RGB: 11 bands
    out = jpeg_roundtrip(img, 10)
    band = 8 * (BAND_PIXELS + 10 * img.shape[1])  # bytes of one float64 band of a channel, with SSIM's margin
    tracemalloc.start()
    try:
        image_metrics(img, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30 * band, f"{peak / band:.1f} float64 bands"  # SSIM 17; on the whole image 181, PSNR 102
