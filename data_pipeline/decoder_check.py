"""How far DALI's JPEG paths are from Pillow/libjpeg, the decoder every evaluation uses:

    python -m data_pipeline.decoder_check --data-root ../shared/data [--dataset live1_gray] [--device cuda]

(a) decode shift: the same Pillow-made JPEG files decoded by DALI (nvJPEG with --device cuda,
    libjpeg-turbo on the CPU) and by Pillow, PSNR of each against the original: a model trained on
    one decoder's output and tested on the other's sees this as a domain shift (in dB);
(b) DALI's `jpeg_compression_distortion` (the online mode's JPEG imitation) against a real
    Pillow encode + decode at the same quality;
(c) decode time per image for the JPEGs and for the PNG originals (nvJPEG does not decode PNG:
    DALI's "mixed" decoder hands those to its CPU codecs).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from .errors import command
from .images import atomic_write_json, check_output_file, decode_jpeg, jpeg_bytes, list_images, output_file, png_bytes, read_image
from .loaders import dali_available
from .prepare import parse_qualities
from .sources import DataError, dataset_dir


def _psnr(original: np.ndarray, other: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(original, other, data_range=255))


class DaliCodec:
    """One-image-at-a-time DALI decoder and JPEG-distortion pipelines on `device` ('cpu' or 'cuda')."""

    def __init__(self, device: str, mode: str):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        self.gpu = device == "cuda"
        self.mode = mode
        kw = dict(batch_size=1, num_threads=2, device_id=0 if self.gpu else None, prefetch_queue_depth=1)

        @pipeline_def(**kw)
        def decode():
            data = fn.external_source(name="bytes", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(data, device="mixed" if self.gpu else "cpu",
                                     output_type=types.GRAY if mode == "gray" else types.RGB)

        @pipeline_def(**kw)
        def distort():
            img = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC")
            quality = fn.external_source(name="quality", dtype=types.INT32, ndim=0)
            return fn.jpeg_compression_distortion(img.gpu() if self.gpu else img, quality=quality)

        self.decode_pipe, self.distort_pipe = decode(), distort()
        self.decode_pipe.build()
        self.distort_pipe.build()

    @staticmethod
    def _first(out) -> np.ndarray:
        batch = out[0].as_cpu() if hasattr(out[0], "as_cpu") else out[0]
        return np.array(batch.at(0))

    def decode(self, data: bytes) -> np.ndarray:
        self.decode_pipe.feed_input("bytes", [np.frombuffer(data, dtype=np.uint8)])
        img = self._first(self.decode_pipe.run())
        return img[..., 0] if self.mode == "gray" else img

    def distort(self, img: np.ndarray, quality: int) -> np.ndarray:
        rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img  # the encoder takes RGB, as the online loader
        self.distort_pipe.feed_input("image", [np.ascontiguousarray(rgb)])
        self.distort_pipe.feed_input("quality", [np.array(quality, dtype=np.int32)])
        out = self._first(self.distort_pipe.run())
        return out[..., 0] if img.ndim == 2 else out


def _timed(fn, items) -> tuple[list, float]:
    """Results of fn over items and the mean milliseconds per item (after one warm-up call)."""
    fn(items[0])
    t0 = time.perf_counter()
    out = [fn(x) for x in items]
    return out, (time.perf_counter() - t0) / len(items) * 1000


def check(originals: list[np.ndarray], qualities: list[int], device: str, mode: str) -> dict:
    codec = DaliCodec(device, mode)
    result = {"device": device, "mode": mode, "images": len(originals), "qualities": {}}
    pngs = [png_bytes(o) for o in originals]
    _, result["png_decode_ms"] = _timed(codec.decode, pngs)
    _, result["png_decode_ms_pillow"] = _timed(decode_jpeg, pngs)  # Pillow's open() takes any format
    for q in qualities:
        files = [jpeg_bytes(o, q) for o in originals]
        pillow, pillow_ms = _timed(decode_jpeg, files)
        dali, dali_ms = _timed(codec.decode, files)
        distorted = [codec.distort(o, q) for o in originals]
        diffs = [np.abs(a.astype(np.int16) - b) for a, b in zip(dali, pillow)]
        distortion_diffs = [np.abs(a.astype(np.int16) - b) for a, b in zip(distorted, pillow)]
        row = {
            "pillow_psnr": float(np.mean([_psnr(o, p) for o, p in zip(originals, pillow)])),
            "dali_psnr": float(np.mean([_psnr(o, d) for o, d in zip(originals, dali)])),
            "decode_max_abs_diff": int(max(int(d.max()) for d in diffs)),
            "decode_pixels_differing": float(np.mean([np.count_nonzero(d) / d.size for d in diffs])),
            "distortion_psnr": float(np.mean([_psnr(o, d) for o, d in zip(originals, distorted)])),
            "distortion_max_abs_diff": int(max(int(d.max()) for d in distortion_diffs)),
            "distortion_pixels_differing": float(np.mean([np.count_nonzero(d) / d.size for d in distortion_diffs])),
            "jpeg_decode_ms_pillow": pillow_ms, "jpeg_decode_ms_dali": dali_ms,
        }
        row["decode_shift_db"] = row["dali_psnr"] - row["pillow_psnr"]
        row["distortion_shift_db"] = row["distortion_psnr"] - row["pillow_psnr"]
        result["qualities"][q] = row
    return result


def report(result: dict) -> str:
    lines = [f"DALI on {result['device']} against Pillow/libjpeg, {result['images']} {result['mode']} images "
             f"(PSNR against the originals, dB; shift = DALI - Pillow)",
             f"{'q':>3} {'Pillow':>8} {'DALI dec':>8} {'shift':>7} {'max|d|':>6} {'differ':>7} "
             f"{'distort':>8} {'shift':>7} {'max|d|':>6} {'differ':>7} {'ms Pil':>7} {'ms DALI':>7}",
             "    (decode: DALI's decode of the Pillow-made file; distort: DALI's jpeg_compression_distortion of the original;"
             " max|d| and differ: against Pillow's decode)"]
    for q, r in result["qualities"].items():
        lines.append(f"{q:>3} {r['pillow_psnr']:8.3f} {r['dali_psnr']:8.3f} {r['decode_shift_db']:+7.3f} "
                     f"{r['decode_max_abs_diff']:6d} {r['decode_pixels_differing']:7.2%} {r['distortion_psnr']:8.3f} "
                     f"{r['distortion_shift_db']:+7.3f} {r['distortion_max_abs_diff']:6d} {r['distortion_pixels_differing']:7.2%} "
                     f"{r['jpeg_decode_ms_pillow']:7.2f} {r['jpeg_decode_ms_dali']:7.2f}")
    lines.append(f"PNG originals: DALI {result['png_decode_ms']:.2f} ms/image, Pillow {result['png_decode_ms_pillow']:.2f}")
    return "\n".join(lines)


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root")
    ap.add_argument("--dataset", default="live1_gray", help="folder of original images (live1_gray, live1_color, or a path)")
    ap.add_argument("--mode", choices=["gray", "rgb"], help="default: rgb for a *color* dataset, else gray")
    ap.add_argument("--qualities", default="10,20,40", help="comma-separated JPEG qualities, or a range: 5-95:5")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--json", type=output_file, default=Path("outputs/decoder_check.json"))
    args = ap.parse_args(argv)
    check_output_file(args.json, "--json", json_only=True)
    if not dali_available():
        raise DataError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: this machine has no usable CUDA GPU")
    mode = args.mode or ("rgb" if "color" in args.dataset else "gray")
    qualities = parse_qualities(args.qualities)
    folder = dataset_dir(args.dataset, args.data_root)
    originals = [read_image(p, mode) for p in list_images(folder)]
    if not originals:
        raise DataError(f"no images in {folder}")
    result = check(originals, qualities, device, mode)
    result["dataset"] = str(folder)
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    print(report(result))
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
