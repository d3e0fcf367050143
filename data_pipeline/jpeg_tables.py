"""The quality a JPEG was saved at, from its own quantization tables (Pillow exposes them): the
IJG quality whose scaled standard luma table matches the file's, exactly for libjpeg-made files,
nearest otherwise. A decoded PNG has no tables: the quality is then unknown (None)."""
from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image


@functools.cache
def _ijg_luma_tables() -> np.ndarray:
    """100 x 64: the luma table libjpeg writes at quality 1..100 (as Pillow reads it back)."""
    tables = []
    for q in range(1, 101):
        buf = io.BytesIO()
        Image.new("L", (8, 8)).save(buf, format="JPEG", quality=q)
        tables.append(Image.open(buf).quantization[0])
    return np.array(tables, dtype=np.int64)


def luma_table(source: Path | str | Image.Image) -> np.ndarray | None:
    """The first (luma) quantization table of a file or an opened image, 64 values; None without one."""
    if not isinstance(source, Image.Image):
        with Image.open(source) as im:
            return luma_table(im)
    tables = getattr(source, "quantization", None)
    return np.array(tables[0], dtype=np.int64) if tables else None


def estimate_quality(table: np.ndarray | None) -> tuple[int, bool] | None:
    """(IJG quality 1..100 whose table is nearest, whether it matches exactly), or None without a table."""
    if table is None:
        return None
    err = np.abs(_ijg_luma_tables() - table[None, :]).sum(1)
    q = int(np.argmin(err))
    return q + 1, bool(err[q] == 0)


def jpeg_quality(source: Path | str | Image.Image) -> tuple[int, bool] | None:
    return estimate_quality(luma_table(source))


def grid_blockiness(luma: np.ndarray) -> float:
    """Mean absolute step between neighbouring pixels across the lines of JPEG's 8x8 grid over the
    mean step everywhere else: about 1 without blocking, higher the coarser a JPEG quantized the
    blocks. A JPEG saved again at a high quality keeps the blocks of an earlier, worse one."""
    y = luma.astype(np.float32)
    across = [np.abs(np.diff(y, axis=1)), np.abs(np.diff(y, axis=0))]
    on_grid = [across[0][:, 7::8], across[1][7::8]]
    grid_sum, grid_n = sum(float(d.sum()) for d in on_grid), sum(d.size for d in on_grid)
    rest_sum, rest_n = sum(float(d.sum()) for d in across) - grid_sum, sum(d.size for d in across) - grid_n
    return (grid_sum / grid_n) / max(rest_sum / max(rest_n, 1), 1e-6) if grid_n else 1.0
