"""Shared fixtures. Real data comes from $JPEG_RESTORE_DATA_ROOT: without it the tests that
need it are skipped with the reason, except under CI (CI=true), where that is a failure."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.images import read_image
from data_pipeline.prepare import prepare
from data_pipeline.sources import DATA_ROOT_ENV


@pytest.fixture(scope="session")
def data_root() -> Path:
    value = os.environ.get(DATA_ROOT_ENV, "")
    if not value or not Path(value).is_dir():
        reason = f"real data not found: set {DATA_ROOT_ENV} to the data root (e.g. ../shared/data); got {value!r}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return Path(value)


@pytest.fixture(scope="session")
def train400_prepared(data_root, tmp_path_factory) -> Path:
    """Train400 prepared in gray at q10 and q40 (about a second, shared by the session)."""
    out = tmp_path_factory.mktemp("prepared") / "train400"
    prepare(data_root / "train400", out, "gray", [10, 40], progress=False)
    return out


@pytest.fixture
def real_images(data_root, tmp_path) -> Path:
    """A small folder of real gray training images (copied to a temp dir)."""
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((data_root / "train400").iterdir())[:6]:
        shutil.copy(p, src / p.name)
    return src


@pytest.fixture
def live1_pair(data_root) -> tuple[np.ndarray, np.ndarray]:
    """One LIVE1 image in gray and in rgb."""
    return read_image(data_root / "live1_gray" / "bikes.png", "gray"), read_image(data_root / "live1_color" / "bikes.png", "rgb")
