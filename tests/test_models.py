import pytest
import torch

from train.models import architectures, build_model


def test_registry_lists_and_rejects():
    assert "dncnn" in architectures()
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        build_model("nope")


@pytest.mark.parametrize("channels", [1, 3])
def test_dncnn_keeps_shape_on_odd_sizes(channels):
    model = build_model("dncnn", channels=channels, depth=5, width=8).eval()
    x = torch.rand(2, channels, 33, 47)
    assert model(x).shape == x.shape
