"""The crop rule every backend shares: offsets on the 8x8 JPEG grid from a uniform draw."""
from __future__ import annotations

import numpy as np


def crop_offset(u: float, size: int, patch: int, align: int) -> int:
    """Offset of a crop for a uniform draw u in [0, 1); DALI's pipeline uses the same formula."""
    return int(np.floor(np.float32(u) * np.float32(size - patch) / np.float32(align))) * align
