"""Settings of the data pipeline (the `[data]` table of a training config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .loaders import backend_choices
from .prepare import MIN_TILE

SEED_MAX = 2**31 - 1  # the range every generator takes (DALI's, numpy's, torch's)


@dataclass
class DataConfig:
    backend: str = "auto"
    """Loader (data_pipeline/backends/): 'resident' (the decoded dataset on the training device),
    'dali' (GPU JPEG decoding; CPU without a GPU), 'torch', 'synthetic', or 'auto': resident when
    the prepared data fits data.resident_mb, else the first available of dali (gray only: its GPU
    RGB decode is not libjpeg's), torch."""
    data_root: str = ""
    """Folder holding the datasets; empty means $JPEG_RESTORE_DATA_ROOT."""
    dataset: str = "train400"
    """Training dataset: a folder name in the data root, a path, an archive, or 'skimage'."""
    prepared_dir: str = ""
    """A folder prepared beforehand (python -m data_pipeline.prepare) that training reads as it is,
    taking its source, val_fraction and min_size (said where the config differs); empty: training
    prepares data.dataset into <out>/prepared/<dataset>-<mode>."""
    mode: str = "gray"
    """'gray' (BT.601 luma, 1 channel) or 'rgb' (3 channels)."""
    qualities: list[int] = field(default_factory=lambda: [10, 20, 30, 40])
    """JPEG qualities of the prepared inputs (offline mode) and of validation."""
    online: bool = False
    """Make inputs on the fly at a random quality from online_quality_range instead of reading files."""
    online_quality_range: list[int] = field(default_factory=lambda: [10, 40])
    """Inclusive [min, max] quality range of the online mode."""
    patch_size: int = 64
    """Side of the square training patches (a multiple of 8 keeps the JPEG grid under flips)."""
    batch_size: int = 32
    """Patches per batch on each process (a micro-batch with train.grad_accum_steps)."""
    val_fraction: float = 0.1
    """Share of the training images held out for validation (deterministic, by name hash)."""
    augment: bool = True
    """Random crops, flips and 90-degree rotations; False takes the centre crop (tests, baselines)."""
    crop_align: int = 8
    """Crop offsets are multiples of this (8 keeps the 8x8 JPEG block grid where the test images have it)."""
    workers: int = 2
    """Worker processes of the torch backend (persistent), threads of the DALI pipeline."""
    cache_mb: int = 1024
    """Decoded images each torch-backend worker keeps in memory (MiB), so each file is decoded once."""
    quality_plane: bool = False
    """Append the JPEG quality as a constant input plane (uint8 q, i.e. q/255 after scaling; needs an
    architecture with model.kwargs.cond_channels = 1); a blind_fraction of the samples get 0 (unknown)."""
    blind_fraction: float = 0.2
    """Share of training samples whose quality plane is 0, so the model also restores without a quality."""
    resident_mb: int = 8192
    """Memory the resident backend may take for the decoded dataset (MiB; GPU memory on CUDA)."""
    min_size: int = 48
    """Images with a side below this are skipped by preparation."""
    tile_size: int = 0
    """Preparation cuts training images larger than this into tiles of this side, overlapping by half,
    so the torch and DALI backends decode a tile, not a whole photo, for each patch (for sets of
    megapixel photos such as DIV2K that do not fit data.resident_mb); held-out images stay whole.
    0 keeps whole images. At least data.patch_size."""
    seed: int = 0
    """Seed of shuffling and augmentation."""
    limit: int = 0
    """Use only the first N images of each split (0 = all); `--smoke` sets it."""

    def __post_init__(self):
        if self.backend not in backend_choices():
            raise ValueError(f"data.backend must be one of {', '.join(backend_choices())}, got {self.backend!r}")
        if self.mode not in ("gray", "rgb"):
            raise ValueError(f"data.mode must be 'gray' or 'rgb', got {self.mode!r}")
        if not self.qualities or not all(1 <= q <= 100 for q in self.qualities):
            raise ValueError(f"data.qualities must be JPEG qualities in 1..100, got {self.qualities}")
        if len(set(self.qualities)) < len(self.qualities):
            raise ValueError(f"data.qualities must name each quality once, got {self.qualities}")
        lo, hi = self.online_quality_range
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"data.online_quality_range must be [min, max] in 1..100, got {self.online_quality_range}")
        for name in ("patch_size", "batch_size", "crop_align", "min_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        for name in ("workers", "cache_mb", "resident_mb", "limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"data.seed must be in 0..{SEED_MAX}, got {self.seed}")
        if not 0 <= self.blind_fraction <= 1:
            raise ValueError(f"data.blind_fraction must be in [0, 1], got {self.blind_fraction}")
        if self.tile_size and self.tile_size < max(self.patch_size, MIN_TILE) or self.tile_size < 0:
            raise ValueError(f"data.tile_size must be 0 (whole images) or at least data.patch_size {self.patch_size} "
                             f"(and {MIN_TILE}), got {self.tile_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "gray" else 3
