"""Restore JPEG images with a trained model.

    python -m serve_bench.restore photo.jpg scans/ -o restored/ [--recursive] [--backend torch|onnxruntime|tensorrt] [--overwrite]

A folder gives its image files and anything else Pillow opens (WebP, GIF); other files are named
once and passed over, and so are its subfolders unless --recursive, which restores theirs into the
same subfolders of the output folder. Any size up to 179 MP (tiled above 512 px with overlap, so the model's
memory stays bounded; the image's own grows with it: a 169 MP gray JPEG took 2.0 GB, a 176 MP
color one 6.0 GB; one that does not fit is skipped and reported), gray or color. A gray model on a
color image restores the luma (Y of JPEG's own YCbCr) and keeps the chroma; an RGB model restores
all three channels; a gray photo stored as RGB (three equal channels) is gray. Writes <name>.png
into the output folder (not an input folder); inputs with the same name get <name>-2.png,
<name>-3.png, ... It never writes over an input, and never over a file it did not create in this
run unless --overwrite is given. A JPEG saved at a quality above the model's bound (read from the
file's own tables) is left as it is and reported: a model trained on q10-40 makes a q90 photo
worse. The bound is the one train.quality_bound measured and recorded in the checkpoint, else the
highest quality the model was trained on; --max-quality moves it. A JPEG above it whose pixels
still carry the 8x8 blocks of an earlier, worse JPEG (saved again at a high quality) is restored
anyway, unless --max-quality or --quality is given. The default model is
image_compression_model.pth in the repository (gray) and, for color images,
image_compression_model_color.pth next to it when it exists. The PNG keeps the input's color
profile and EXIF data, and stands as viewers show the input: a camera JPEG tagged with an EXIF
orientation is restored as stored (on its 8x8 block grid), then turned.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data_pipeline.errors import UserError, command, out_of_memory, some
from data_pipeline.images import (
    IMAGE_SUFFIXES,
    BadImage,
    UnreadableFolder,
    atomic_write_bytes,
    check_output_folder,
    image_files,
    is_gray,
    png_bytes,
    read_image,
    rgb_to_luma,
    upright,
)
from data_pipeline.jpeg_tables import grid_blockiness, jpeg_quality
from data_pipeline.sources import dangling
from data_pipeline.system import keep_freed_memory
from export.artifacts import DEPLOY_DIR, artifact_for
from runtime.checkpoint import load_model
from runtime.device import PRECISIONS, add_device_option, check_device, emulated_precision_warning, native_bf16
from runtime.inference import SHIPPED_GRAY, image_to_tensor, in_model_mode, is_conditioned, shipped_model, to_uint8, trained_qualities, with_quality
from runtime.mlflow_store import checkpoint_path
from runtime.runners import available_runner, make_runner, runners
from runtime.tiling import tile_count


class Models:
    """The gray and the color images' (runner, checkpoint metadata). Each checkpoint is read now; its
    runner opens when an image first needs it, so gray photos through --backend aoti or onnxruntime
    never export the color model (AOTInductor: 31 s of compiling on a 2-core EPYC)."""

    def __init__(self, checkpoints: dict[str, Path], backend: str, device: str, deploy_dir: Path, precision: str):
        self.checkpoints, self.backend, self.device, self.deploy_dir = checkpoints, backend, device, deploy_dir
        read = {c: load_model(c)[1] for c in set(checkpoints.values())}  # one model for both kinds is read once
        self.meta = {kind: read[c] for kind, c in checkpoints.items()}
        self.artifact = runners()[backend].artifact
        self.options = {"precision": precision} if self.artifact == "checkpoint" else {}  # the others run their file's
        self.opened: dict[Path, object] = {}

    def __getitem__(self, kind: str) -> tuple[object, dict]:
        checkpoint = self.checkpoints[kind]
        if checkpoint not in self.opened:  # the file for this backend, exported on demand
            artifact = artifact_for(self.artifact, checkpoint, self.deploy_dir, device=self.device)
            self.opened[checkpoint] = make_runner(self.backend, artifact, self.device, **self.options)
        return self.opened[checkpoint], self.meta[kind]


def restore_array(runner, meta: dict, img: np.ndarray, ensemble: bool = False, tiles_per_call: int = 1,
                  progress=None, quality: int | None = None) -> np.ndarray:
    """uint8 gray or RGB -> restored uint8 of the same shape; a quality-conditioned model gets
    `quality` (None: blind) as its extra input plane."""
    def restore(x: np.ndarray) -> np.ndarray:
        t = image_to_tensor(x, runner.device)
        if is_conditioned(meta):
            t = with_quality(t, quality)
        with torch.inference_mode():
            y = runner.restore(t, ensemble, tiles_per_call, progress)
            del t  # the input's float copy, before the output's conversion needs memory
            return to_uint8(y[0])  # clipped to 0..255 there

    return in_model_mode(restore, meta["mode"], img)


# Saved once at q85-95, a JPEG's 8x8 blockiness reads under 1.25; saved again so after q10-40, over 1.3
# (docs/experiments.md). Below q85 a JPEG's own blocks may read 1.3 and more.
RESAVED_MIN_QUALITY, RESAVED_BLOCKINESS = 85, 1.3


def above_range(quality: int | None, meta: dict, max_quality: int | None) -> str | None:
    """Why a JPEG of this quality is left as it is (None: restore it): above --max-quality, or by
    default above the bound measured for the model (train.quality_bound), else above the highest
    quality it was trained on."""
    trained = trained_qualities(meta)
    measured = meta.get("restore_max_quality")
    bound = max_quality or measured or (trained and trained[1])
    if quality is None or bound is None or quality <= bound:
        return None
    if max_quality:
        return f"JPEG q{quality} is above --max-quality {max_quality}"
    if measured:
        return (f"JPEG q{quality} is above q{measured}, the highest quality at which the model still gained on its "
                f"validation images (--max-quality 100 restores it anyway)")
    return (f"JPEG q{quality} is above the q{trained[0]}-{trained[1]} the model was trained on, where it "
            f"would lose detail (--max-quality 100 restores it anyway)")


class Header(NamedTuple):
    quality: tuple[int, bool] | None  # (q, exact) from the JPEG's tables; None: not a JPEG
    icc_profile: bytes | None
    exif: bytes | None


def read_header(path: Path) -> Header | None:
    """What the file's header says (None where Pillow cannot open it: read_image then says why)."""
    try:
        with Image.open(path) as im:
            return Header(jpeg_quality(im), im.info.get("icc_profile"), im.info.get("exif"))
    except Exception:  # Pillow raises many types for broken files
        return None


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries that over
    from the parent through fork and exec, so a restore started by a 2 GB process reported 2 GB."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):  # no /proc (macOS): ru_maxrss counts bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory(device: str) -> str:
    """This process's peak memory: host RSS, and GPU memory allocated by torch on CUDA."""
    text = f"{peak_rss_mib():.0f} MiB host (peak RSS)"
    if device.startswith("cuda"):
        text += f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU (peak allocated)"
    return text


def inputs_of(paths: list[Path], recursive: bool = False, out: Path | None = None) -> tuple[list[tuple[Path, Path]], list[Path], list[str]]:
    """(the files to restore, each with the subfolder of the output it goes to; the other entries of
    named folders: files that are not images at all and subfolders not searched; the subfolders that
    could not be read, with why). A folder gives its visible image files (a broken one is reported)
    and any other file Pillow opens (WebP, GIF); with `recursive` its visible subfolders' too, into the
    same subfolders of the output (never the output folder itself, nor a linked folder). A file named
    is always tried, once however often it is given; a folder named that cannot be read is an error."""
    files, others, unreadable = [], [], []
    skip = out.resolve() if out else None

    def walk(folder: Path, where: Path) -> None:
        try:
            images, rest = image_files(folder)
        except UnreadableFolder as exc:
            if where == Path():  # a folder named
                raise
            unreadable.append(f"{where}/: {exc.reason}")
            return
        files.extend((f, where) for f in images)
        for entry in rest:
            if recursive and entry.is_dir() and not entry.is_symlink() and entry.resolve() != skip:
                walk(entry, where / entry.name)
            else:
                others.append(entry)

    for p in paths:
        if p.is_dir():
            walk(p, Path())
        elif p.exists():
            files.append((p, Path()))
        else:
            raise UserError(f"{p} does not exist")
    once = {}
    for f, where in files:
        once.setdefault(f.resolve(), (f, where))
    return list(once.values()), others, unreadable


def plan_outputs(files: list[tuple[Path, Path]], out: Path) -> list[Path]:
    """One output per input, in its subfolder of `out`: <stem>.png, then <stem>-2.png, ... where
    earlier inputs took the name."""
    taken, targets = set(), []
    for f, where in files:
        name, n = f"{f.stem}.png", 1
        while (where, name) in taken:
            n += 1
            name = f"{f.stem}-{n}.png"
        taken.add((where, name))
        targets.append(out / where / name)
    return targets


@command
def main(argv=None) -> int:
    names = list(runners())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="JPEG images or folders of images")
    ap.add_argument("-o", "--out", required=True, help="output folder for the restored PNGs")
    ap.add_argument("--backend", default="torch", choices=names)
    ap.add_argument("--checkpoint", type=checkpoint_path, help="model for gray images (and color, unless --color-checkpoint); "
                    "a file, or a registered version: models:/NAME@ALIAS, models:/NAME/VERSION")
    ap.add_argument("--color-checkpoint", type=checkpoint_path, help="RGB model for color images")
    ap.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR, help="exported ONNX files / TensorRT engines (python export/to_trt.py)")
    add_device_option(ap)
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="torch backends: auto is bf16 where the device computes it natively (the shipped models' LIVE1 "
                    "PSNR the same to 0.01 dB as in fp32; the gray model 1.8x faster on an AVX-512 BF16 CPU), else fp32; "
                    "the other backends run their exported file's precision")
    ap.add_argument("-r", "--recursive", action="store_true", help="restore the images of the input folders' subfolders too, "
                    "into the same subfolders of the output folder")
    ap.add_argument("--overwrite", action="store_true", help="replace existing files in the output folder (never an input)")
    ap.add_argument("--tiles-per-call", type=int, help="512-px tiles of a large image per model call (default: 4 on GPU, 1 on CPU)")
    ap.add_argument("--self-ensemble", action="store_true",
                    help="average the model over the 8 rotations and flips of each image (8x the time, a little sharper)")
    ap.add_argument("--max-quality", type=int, help="restore JPEGs saved at up to this quality, leave the others "
                    "(default: the bound recorded by train.quality_bound, else the highest quality the model was trained "
                    "on; 100 restores every JPEG)")
    ap.add_argument("--quality", type=int, help="the quality to tell a quality-conditioned model, for every input "
                    "(default: each JPEG's, read from its tables; none for a file without tables, which runs it blind): "
                    "for a PNG of a decoded JPEG, or a photo saved again at a higher quality")
    args = ap.parse_args(argv)
    keep_freed_memory()
    args.device = check_device(args.device)
    # a backend that cannot run here is said now; the non-torch ones run their exported file's precision
    torch_backend = available_runner(args.backend, args.device).artifact == "checkpoint"
    if not torch_backend and args.precision != "auto":
        raise UserError(f"--precision is for the torch backends; {args.backend} runs its exported file's precision")
    precision = args.precision if args.precision != "auto" else "bf16" if native_bf16(torch.device(args.device)) else "fp32"
    backend = f"{args.backend} {precision}" if torch_backend else args.backend
    if slow := emulated_precision_warning(precision, torch.device(args.device)):
        print(f"warning: {slow}", file=sys.stderr)
    tiles_per_call = args.tiles_per_call if args.tiles_per_call is not None else (4 if args.device.startswith("cuda") else 1)
    if tiles_per_call < 1:
        raise UserError(f"--tiles-per-call must be positive, got {tiles_per_call}")
    for name, value in (("--max-quality", args.max_quality), ("--quality", args.quality)):
        if value is not None and not 1 <= value <= 100:
            raise UserError(f"{name} must be a JPEG quality in 1..100, got {value}")
    named_folder, args.out = args.out.endswith(("/", os.sep)), Path(args.out)  # restored.png/ is a folder
    if args.out.suffix.lower() in IMAGE_SUFFIXES and not (named_folder or args.out.is_dir()):
        raise UserError(f"-o {args.out} names an image, and -o takes a folder: each input is written into it as "
                        f"<name>.png (-o {args.out.parent / args.out.stem})")
    if any(p.is_dir() and p.resolve() == args.out.resolve() for p in args.inputs):
        raise UserError(f"-o {args.out} is one of the input folders: the next run would restore its restored PNGs "
                        "again; write them to another folder")
    files, others, unreadable = inputs_of(args.inputs, args.recursive, args.out)
    folders = [f"{p.name}/" for p in others if p.is_dir()]
    links = [p.name for p in others if dangling(p)]
    others = [p.name for p in others if not p.is_dir() and not dangling(p)]
    for what, names in (("file(s) of the input folders that are not images", others),
                        ("link(s) of the input folders to files that do not exist", links),
                        ("subfolder(s) of the input folders, which are not searched", folders),
                        ("subfolder(s) that cannot be read", unreadable)):
        if names:
            print(f"passed over {len(names)} {what} ({some(names)})", file=sys.stderr)
    check_output_folder(args.out)
    gray_ckpt = args.checkpoint or SHIPPED_GRAY
    color_ckpt = args.color_checkpoint or args.checkpoint or shipped_model(color=True)
    models = Models({"gray": gray_ckpt, "color": color_ckpt}, args.backend, args.device, args.deploy_dir, precision)
    blind = [c for c, kind in ((gray_ckpt, "gray"), (color_ckpt, "color")) if not is_conditioned(models.meta[kind])]
    if args.quality and blind:
        raise UserError(f"--quality is told to quality-conditioned models, and {blind[0]} is blind "
                        "(trained without data.quality_plane): it reads no quality")
    if not files:
        raise UserError(f"no images to restore in {', '.join(map(str, args.inputs))}")
    resolved_inputs = {f.resolve() for f, _ in files}
    failed = kept = 0
    for (f, _), target in zip(files, plan_outputs(files, args.out)):
        if target.resolve() in resolved_inputs:
            print(f"skipped {f}: the output {target} would overwrite an input", file=sys.stderr)
            failed += 1
            continue
        if target.exists() and not args.overwrite:
            print(f"skipped {f}: {target} already exists (--overwrite replaces it)", file=sys.stderr)
            failed += 1
            continue
        header = read_header(f) or Header(None, None, None)
        quality = header.quality
        told = args.quality or (quality and quality[0])  # what the model is told, and what the range check reads
        why = args.max_quality and above_range(told, {}, args.max_quality)  # the user's bound, before decoding
        blockiness = None
        if not why:
            try:
                img = read_image(f, None, min_size=8)
            except (BadImage, OSError) as exc:
                print(f"skipped {f}: {exc}", file=sys.stderr)
                failed += 1
                continue
            gray = is_gray(img)
            runner, meta = models["gray" if gray else "color"]
            why = above_range(told, meta, args.max_quality)  # the bound of the model that restores it
            if why and not args.quality and told >= RESAVED_MIN_QUALITY:
                blockiness = grid_blockiness(img if img.ndim == 2 else rgb_to_luma(img))
                if blockiness >= RESAVED_BLOCKINESS:  # an earlier, worse JPEG's blocks: restored, the model blind
                    why, told = None, None
        if why:
            print(f"left {f} as it is: {why}", file=sys.stderr)
            kept += 1
            continue
        tiles = tile_count(*img.shape[:2])
        try:
            with tqdm(total=tiles, unit="tile", desc=f.name, leave=False, disable=tiles < 8 or not sys.stderr.isatty(),
                      file=sys.stderr) as bar:  # a bar in a log is its redraws run together
                restored = restore_array(runner, meta, img, args.self_ensemble, tiles_per_call, bar.update, told)
        except (RuntimeError, MemoryError) as exc:  # the next, smaller images may fit
            if (what := out_of_memory(exc)) is None:
                raise
            fewer = "; --tiles-per-call 1 needs less" if tiles_per_call > 1 else ""
            print(f"skipped {f}: out of memory restoring it ({img.shape[1]}x{img.shape[0]}) on {args.device}: {what}{fewer}",
                  file=sys.stderr)
            failed += 1
            continue
        # restored as stored (the 8x8 grid the JPEG's blocks sit on), then turned as viewers show the input
        restored, exif, exif_problem = upright(restored, header.exif)
        target.parent.mkdir(parents=True, exist_ok=True)  # a subfolder, with --recursive
        atomic_write_bytes(target, png_bytes(restored, header.icc_profile, exif))
        how = ("gray stored as RGB" if gray else "luma only") if img.ndim == 3 and meta["mode"] == "gray" else meta["mode"]
        saved = "no JPEG tables" if quality is None else f"JPEG q{quality[0]}" + ("" if quality[1] else " (nearest IJG table)")
        saved += f", told q{args.quality}" if args.quality else ""
        saved += f", re-saved after a worse JPEG (8x8 blockiness {blockiness:.2f})" if blockiness and not why else ""
        turned = ", turned as its EXIF orientation says" if exif != header.exif else ""
        turned += f", EXIF not all readable ({exif_problem}): not turned" if exif_problem else ""
        print(f"{f} -> {target} ({img.shape[1]}x{img.shape[0]}, {saved}, {meta['arch']} {how}, {backend}{turned})")
    left = f", {kept} left as they are (quality above the model's)" if kept else ""
    restored = len(files) - failed - kept
    where = f"into {args.out}" if restored else "(nothing written)"
    print(f"restored {restored} of {len(files)} images {where}{left}; peak memory {peak_memory(args.device)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
