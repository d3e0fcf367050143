"""NVIDIA DALI backend: nvJPEG decoding on the GPU (device="mixed"), a CPU-only pipeline
(device_id=None) when there is no GPU. DALI itself is imported only when this backend runs."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging

import numpy as np
import torch

from . import Backend, register_backend

log = logging.getLogger(__name__)
# data_pipeline.decoder_check on LIVE1 color, NVIDIA H200, DALI 2.4.0 (docs/results/gpu/decoder_color.json)
RGB_DECODE_SHIFT = ("nvJPEG's RGB decode is not libjpeg's, the decoder of every evaluation (-0.10 dB against the "
                    "originals on LIVE1 color q10, 12% of pixels differ, H200): training inputs would not be test inputs")


def _crop_anchor(u, v, shape, patch: int, align: int):
    """Same formula as patches.crop_offset, on DALI nodes: floor(u*(S-P)/align)*align."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.math import floor as dali_floor

    def one(r, size):
        return dali_floor(r * fn.cast(size - patch, dtype=types.FLOAT) / float(align)) * align
    return fn.cast(fn.stack(one(u, shape[0]), one(v, shape[1])), dtype=types.INT32)


def pair_pipeline(jpeg_files, original_files, qualities, cfg, shard_id: int, num_shards: int, decode_device: str,
                  **pipe_kwargs):
    """The DALI pipeline of (input, target, quality) samples, built with `pipe_kwargs` (batch size,
    threads, device). `qualities` are the JPEG files' qualities; quality is 0 for the blind share."""
    from nvidia.dali import pipeline_def

    return pipeline_def(_pair_graph, enable_conditionals=True)(jpeg_files, original_files, qualities, cfg, shard_id,
                                                               num_shards, decode_device, **pipe_kwargs)


def _pair_graph(jpeg_files, original_files, qualities, cfg, shard_id: int, num_shards: int, decode_device: str):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    image_type = types.GRAY if cfg.mode == "gray" else types.RGB
    # same seed on every rank: one global order. Files read, not mapped: one cut short under a mapping killed
    # the process with SIGBUS instead of the error that names it (Train400 on 2 CPU threads: the same patches/s)
    reader = dict(shard_id=shard_id, num_shards=num_shards, shuffle_after_epoch=cfg.augment,
                  pad_last_batch=True, seed=cfg.seed, dont_use_mmap=True)
    raw, _ = fn.readers.file(files=original_files, name="originals", **reader)
    target = fn.decoders.image(raw, device=decode_device, output_type=image_type)
    if jpeg_files is not None:
        raw_jpeg, quality = fn.readers.file(files=jpeg_files, labels=qualities, **reader)  # same order as the originals
        inp = fn.decoders.image(raw_jpeg, device=decode_device, output_type=image_type)

    if cfg.augment:
        u, v = fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0])
    else:
        u = v = types.Constant(0.5, dtype=types.FLOAT)
    anchor = _crop_anchor(u, v, target.shape(), cfg.patch_size, cfg.crop_align)
    size = np.array([cfg.patch_size] * 2, dtype=np.int32)
    target = fn.slice(target, anchor, size, axes=[0, 1])
    if jpeg_files is None:
        lo, hi = cfg.online_quality_range
        quality = fn.random.uniform(values=list(range(lo, hi + 1)), dtype=types.INT32)
        rgb = fn.cat(target, target, target, axis=2) if cfg.mode == "gray" else target  # encoder wants RGB
        inp = fn.jpeg_compression_distortion(rgb, quality=quality)
        if cfg.mode == "gray":
            inp = inp[:, :, 0:1]
    else:
        inp = fn.slice(inp, anchor, size, axes=[0, 1])

    if cfg.augment:
        h, w = fn.random.coin_flip(), fn.random.coin_flip()
        inp, target = fn.flip(inp, horizontal=h, vertical=w), fn.flip(target, horizontal=h, vertical=w)
        if fn.random.coin_flip(dtype=types.BOOL):
            inp = fn.transpose(inp, perm=[1, 0, 2], transpose_layout=False)
            target = fn.transpose(target, perm=[1, 0, 2], transpose_layout=False)
    if cfg.quality_plane:  # drawn last, as in the torch backend
        quality = quality * fn.random.coin_flip(probability=1.0 - cfg.blind_fraction, dtype=types.INT32)
    return fn.transpose(inp, perm=[2, 0, 1]), fn.transpose(target, perm=[2, 0, 1]), fn.cast(quality, dtype=types.INT32)


@register_backend("dali", order=10)
class DaliSource(Backend):
    """An endless stream of uint8 CHW batches; PairLoader cuts it into equal epochs on every rank.

    The pipeline is built on the first request. A run resumed part-way (epoch or start > 0)
    starts a fresh stream seeded by that position: the same distribution of samples, not the
    exact sequence of an uninterrupted run (the torch backend resumes exactly)."""

    @classmethod
    def unavailable(cls):
        return None if importlib.util.find_spec("nvidia.dali") else \
            "NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)"

    @classmethod
    def unfit(cls, pairs, cfg):
        return RGB_DECODE_SHIFT if cfg.mode == "rgb" else None  # gray decodes equal libjpeg's exactly

    def __init__(self, pairs, cfg, rank: int, world_size: int, device: torch.device):
        self.pairs, self.cfg, self.rank, self.world_size, self.device = pairs, cfg, rank, world_size, device
        self.iterator = None
        if device.type == "cuda" and cfg.mode == "rgb" and rank == 0:  # online: its GPU JPEG shifts as much
            log.warning("data.backend=dali in RGB: %s; the resident and torch backends decode with libjpeg", RGB_DECODE_SHIFT)

    def _build(self, seed: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        cfg, pairs = self.cfg, self.pairs
        order = np.random.default_rng(seed).permutation(len(pairs)) if cfg.augment else np.arange(len(pairs))
        jpegs = [pairs[i][0] for i in order]
        originals = [pairs[i][1] for i in order]
        qualities = [pairs[i][2] for i in order]
        on_gpu = self.device.type == "cuda"
        pipe = pair_pipeline(
            None if cfg.online else jpegs, originals, qualities, dataclasses.replace(cfg, seed=seed), self.rank, self.world_size,
            "mixed" if on_gpu else "cpu", batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
            device_id=(self.device.index or 0) if on_gpu else None, seed=seed + 1000 * self.rank + 1,
        )
        pipe.build()
        # size=-1 without reader_name: runs forever; epochs are counted by PairLoader.
        return DALIGenericIterator(pipe, ["input", "target", "quality"], size=-1, auto_reset=True)

    def batches(self, epoch: int, start: int = 0):
        if self.iterator is None:
            seed = self.cfg.seed if (epoch, start) == (0, 0) else self.cfg.seed + 7919 * epoch + start + 1
            self.iterator = self._build(seed)
        for out in self.iterator:
            inp = out[0]["input"]
            if self.cfg.quality_plane:  # the quality as a uint8 plane, as the other backends give it
                plane = out[0]["quality"].to(inp.device, torch.uint8).reshape(-1, 1, 1, 1)
                inp = torch.cat([inp, plane.expand(-1, 1, *inp.shape[2:])], dim=1)
            yield inp, out[0]["target"]
