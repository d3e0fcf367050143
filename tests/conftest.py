"""Shared fixtures. Most tests run on the photographs that ship inside scikit-image (cut into
small tiles at session start, nothing committed). Only the tests that need LIVE1 or Train400
themselves take `data_root` (marked `data`): without $JPEG_RESTORE_DATA_ROOT they are skipped
with the reason, except under CI (CI=true), where that is a failure."""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.images import read_image, rgb_to_luma
from data_pipeline.prepare import prepare
from data_pipeline.sources import DATA_ROOT_ENV, SKIMAGE_NATURAL, skimage_dir
from data_pipeline.system import keep_freed_memory

TILE = 160  # Train400-like gray tiles (Train400: 180x180)


def pytest_configure(config):
    """Parallel workers share the CPUs: each takes its share of threads (and so do the trainings it
    starts), since two 2-thread torch processes on 2 cores run 3x slower than two 1-thread ones."""
    keep_freed_memory()  # as the commands do: the tests that run models in process skip the page faults
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "data_root" in names:
            item.add_marker(pytest.mark.data)
        if "cluster" in names:
            item.add_marker(pytest.mark.slurm)
    # the files with the most slow tests first: the parallel workers (one file each at a time) then finish together
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: each file's order stays


@pytest.fixture
def in_process(capfd, monkeypatch):
    """in_process(main, *args, cwd=None): a command's main(argv) run in this process, returned as
    subprocess.run returns `python -m` (the exit code; stdout and stderr as the terminal shows them,
    with the warnings a fresh interpreter would print at the end of stderr): 2 s of imports a call
    less, for the checks of a command's messages. Each command's subprocess tests show the rest."""
    def run(main, *args, cwd=None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        argv = [str(a) for a in args]
        capfd.readouterr()  # what came before is not the command's
        with warnings.catch_warnings(record=True) as caught:  # the process's filters (the commands' own among them)
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)  # as Python's defaults, over pytest's "always"
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
        out, err = capfd.readouterr()
        err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
        return subprocess.CompletedProcess(["python", "-m", main.__module__, *argv], code, out, err)
    return run


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
def photos() -> dict[str, np.ndarray]:
    """The natural photographs embedded in scikit-image, each in its own mode (gray or RGB)."""
    return {Path(n).stem: read_image(skimage_dir() / n, None) for n in SKIMAGE_NATURAL}


@pytest.fixture(scope="session")
def photo_pair(photos) -> tuple[np.ndarray, np.ndarray]:
    """One real photograph (astronaut, 512x512) as BT.601 luma and as RGB."""
    rgb = photos["astronaut"]
    return rgb_to_luma(rgb), rgb


def _write_tiles(photos: dict, mode: str, per_photo: int, folder: Path) -> Path:
    """Up to `per_photo` TILE x TILE PNG crops of each photograph (in `mode`), spread over it."""
    for name, img in sorted(photos.items()):
        if mode == "rgb" and img.ndim == 2:
            continue
        img = rgb_to_luma(img) if mode == "gray" and img.ndim == 3 else img
        h, w = img.shape[:2]
        spots = [(y, x) for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)
                 if img[y:y + TILE, x:x + TILE].std() > 12]  # no flat tiles (black sky, white page)
        for i in np.unique(np.linspace(0, len(spots) - 1, min(per_photo, len(spots))).astype(int)):
            y, x = spots[i]
            Image.fromarray(img[y:y + TILE, x:x + TILE]).save(folder / f"{name}_{y}_{x}.png")
    return folder


@pytest.fixture(scope="session")
def tiles_dir(photos, tmp_path_factory) -> Path:
    """About 100 gray 160x160 PNG tiles of the embedded photographs: a small Train400."""
    return _write_tiles(photos, "gray", 8, tmp_path_factory.mktemp("tiles"))


@pytest.fixture(scope="session")
def color_tiles_dir(photos, tmp_path_factory) -> Path:
    return _write_tiles(photos, "rgb", 4, tmp_path_factory.mktemp("color_tiles"))


@pytest.fixture(scope="session")
def tiles_prepared(tiles_dir, tmp_path_factory) -> Path:
    """The gray tiles prepared at q10 and q40 (a second, shared by the session)."""
    out = tmp_path_factory.mktemp("prepared") / "tiles"
    prepare(tiles_dir, out, "gray", [10, 40], progress=False)
    return out


@pytest.fixture
def real_images(tiles_dir, tmp_path) -> Path:
    """A small folder of real gray images (six tiles, copied to a temp dir)."""
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(tiles_dir.iterdir())[:6]:
        shutil.copy(p, src / p.name)
    return src


@pytest.fixture
def live1_pair(data_root) -> tuple[np.ndarray, np.ndarray]:
    """One LIVE1 image in gray and in rgb."""
    return read_image(data_root / "live1_gray" / "bikes.png", "gray"), read_image(data_root / "live1_color" / "bikes.png", "rgb")
