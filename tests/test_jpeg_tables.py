import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline.images import jpeg_bytes
from data_pipeline.jpeg_tables import estimate_quality, jpeg_quality


@pytest.mark.parametrize("quality", [5, 10, 23, 50, 77, 95, 100])
def test_the_quality_of_a_pillow_jpeg_is_read_from_its_tables(tmp_path, photo_pair, quality):
    for img in photo_pair:  # gray and color (4:2:0): the luma table decides
        path = tmp_path / "x.jpg"
        path.write_bytes(jpeg_bytes(img[:64, :80], quality))
        assert jpeg_quality(path) == (quality, True)


def test_files_without_tables_and_foreign_tables(tmp_path, photo_pair):
    png = tmp_path / "decoded.png"
    Image.fromarray(photo_pair[0]).save(png)
    assert jpeg_quality(png) is None
    buf = io.BytesIO()  # a custom table (not IJG-scaled): the nearest quality, not an exact match
    Image.fromarray(photo_pair[0][:64, :64]).save(buf, format="JPEG", qtables=[[16] * 64])
    q, exact = estimate_quality(np.array(Image.open(buf).quantization[0]))
    assert not exact and 1 <= q <= 100
