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
