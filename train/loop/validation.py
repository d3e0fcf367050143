"""Validation on the held-out split of the training data (never LIVE1): whole images, the protocol's
JPEG at every configured quality, every registered metric; the images are sharded over ranks.

On a GPU the metrics (scikit-image, on the CPU) are scored in a pool of processes while the device
restores the next images."""
from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.errors import some
from data_pipeline.images import BadImage, check_detail, decode_jpeg, jpeg_bytes, read_image
from data_pipeline.prepare import check_files, load_manifest, split_records
from data_pipeline.sources import DataError
from data_pipeline.system import STOP_SIGNALS, spawned_pool, start_worker, usable_cpus
from runtime.device import autocast_for
from runtime.inference import image_to_tensor, to_uint8, with_quality
from runtime.metrics import image_metrics, min_image_side
from runtime.metrics import metrics as registered_metrics
from runtime.metrics.psnr import psnr
from runtime.tiling import restore_tensor

from .distributed import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)
FIGURES = 2  # side-by-side images kept per validation (the first quality's first images)
MAX_METRIC_WORKERS = 8


def metric_workers(info: DistInfo) -> int:
    """Processes per rank that score the metrics: none on a CPU (the model needs its cores), else
    the rank's share of the cores, one left for the rank itself."""
    if info.device.type == "cpu":
        return 0
    return max(0, min(MAX_METRIC_WORKERS, usable_cpus() // info.world_size - 1))


def held_out_items(data: DataConfig, rank: int = 0, world_size: int = 1) -> list[tuple[str, int, bytes, np.ndarray]]:
    """(name, quality, JPEG file, original) for this rank's share of the held-out images, every
    quality of each: the JPEG made per the protocol and kept encoded (a tenth of its pixels' size or
    less), so a rank holds its share of the originals and little more."""
    root = Path(data.prepared_dir)
    manifest = load_manifest(root)
    files = split_records(manifest, "val", data.limit)
    if not files:
        raise DataError(f"{root}: no validation images (raise data.val_fraction)")
    side, metric = min_image_side()
    small = [f for f in files if min(f["height"], f["width"]) < side]  # data.min_size may let them in
    if len(small) == len(files):
        raise DataError(f"{root}: every held-out image is smaller than the {side} px a side {metric} needs")
    if small:
        log.warning("passed over %d held-out image(s) smaller than the %d px a side %s needs: %s", len(small), side, metric,
                    some([f"{f['source']} ({f['width']}x{f['height']})" for f in small]))
        files = [f for f in files if f not in small]
    check_files(root, manifest, files)
    items = []
    for f in files[rank::world_size]:
        original = read_image(root / f["original"]["path"], data.mode)
        try:  # prepare skips flat images since 2026-12-06; a folder prepared before may hold one
            check_detail(original)
        except BadImage as exc:
            log.warning("passed over held-out image %s: %s", f["source"], exc)
            continue
        items += [(f["name"], q, jpeg_bytes(original, q), original) for q in data.qualities]
    return items


@contextmanager
def _stop_signals_held():
    """Stop signals wait (they are not lost) while a worker may start: it inherits the block."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Validator:
    def __init__(self, data: DataConfig, precision: str, loss_fn, info: DistInfo, workers: int | None = None):
        self.data, self.precision, self.loss_fn, self.info = data, precision, loss_fn, info
        self.items = held_out_items(data, info.rank, info.world_size)
        # the JPEG inputs' own PSNR, once: each validation reports the model's gain over it
        self.jpeg_psnr = [psnr(original, decode_jpeg(jpeg)) for _, _, jpeg, original in self.items]
        self.figures: list[tuple] = []  # (name, quality, original, JPEG, restored) of the last validation
        workers = metric_workers(info) if workers is None else workers
        self.pool = spawned_pool(workers, start_worker, (os.getpid(), True)) if workers else None  # stop signals: the trainer's

    @torch.no_grad()
    def __call__(self, net: torch.nn.Module) -> dict[str, float]:
        """Mean per quality and over all of every metric: val_<metric>, val_<metric>_q<q>, val_loss.
        The caller puts the net back in training mode."""
        net.eval()
        device, qualities = self.info.device, self.data.qualities
        names = [m.name for m in registered_metrics()]
        sums = torch.zeros(len(qualities), 3 + len(names), dtype=torch.float64)  # count, loss, JPEG PSNR, metrics...
        self.figures, scored = [], []
        for (name, q, jpeg_file, original), jpeg_psnr in zip(self.items, self.jpeg_psnr):
            jpeg = decode_jpeg(jpeg_file)
            x = image_to_tensor(jpeg, device)
            if self.data.quality_plane:
                x = with_quality(x, q)
            with autocast_for(self.precision, device):
                y = restore_tensor(net, x).float().clamp(0, 1)
            restored = to_uint8(y[0])
            loss = float(self.loss_fn(y, image_to_tensor(original, device)))
            scored.append((q, loss, jpeg_psnr, self._score(original, restored)))
            if q == qualities[0] and len(self.figures) < FIGURES:
                self.figures.append((name, q, original, jpeg, restored))
        for q, loss, jpeg_psnr, m in scored:
            m = m.result() if isinstance(m, Future) else m
            sums[qualities.index(q)] += torch.tensor([1, loss, jpeg_psnr] + [m[n] for n in names], dtype=torch.float64)
        sums = all_reduce_sum(sums.to(device), self.info).cpu()
        means = sums[:, 1:] / sums[:, :1]
        result = {}
        for q, row in zip(qualities, means.tolist()):
            result.update({f"val_{n}_q{q}": v for n, v in zip(names, row[2:])})
        overall = means.mean(0).tolist()
        result["val_loss"] = overall[0]
        result.update({f"val_{n}": v for n, v in zip(names, overall[2:])})
        result["val_psnr_gain"] = result["val_psnr"] - overall[1]  # over the JPEG inputs
        return result

    def _score(self, original: np.ndarray, restored: np.ndarray) -> dict[str, float] | Future:
        if not self.pool:
            return image_metrics(original, restored)
        with _stop_signals_held():  # the pool starts its workers as the first images come
            return self.pool.submit(image_metrics, original, restored)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)
