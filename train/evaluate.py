"""Evaluate JPEG restoration on whole test images, per the protocol in the data README.

    python -m train.evaluate --data-root ../shared/data --dataset live1_gray --qualities 10,20,30,40
    python -m train.evaluate --checkpoint runs/unet/image_compression_model.pth --json live1.json --log-mlflow
    python -m train.evaluate --dataset live1_color --jpeg-only

Each original is JPEG-encoded with Pillow at each quality and decoded back; the table gives
PSNR / SSIM / PSNR-B of that JPEG input and of the restored image. Without --checkpoint the
shipped models restore, each image by the model of its kind as in restore
(image_compression_model.pth; for color images the shipped color model when there is one). A gray
model restores a color image's luma and keeps its chroma.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from tqdm import tqdm

from data_pipeline.errors import UserError, command
from data_pipeline.images import (
    BadImage,
    atomic_write_bytes,
    atomic_write_json,
    check_detail,
    check_output_file,
    check_output_folder,
    image_files,
    is_gray,
    jpeg_roundtrip,
    output_file,
    read_image,
)
from data_pipeline.jpeg_tables import jpeg_quality
from data_pipeline.prepare import parse_qualities
from data_pipeline.sources import DataError, dataset_dir, not_a_file
from data_pipeline.system import keep_freed_memory, spawned_pool, start_worker, usable_cpus
from runtime.figures import side_by_side
from runtime.metrics import image_metrics, metrics, min_image_side
from runtime.mlflow_store import checkpoint_path, log_to_run, resolve_tracking_uri, unloggable

# torch and the models are imported where they are used: the metric workers import this module again
# (spawn does), and without torch each starts in 0.3 s and 41 MB instead of 1.6 s and 228 MB
if TYPE_CHECKING:
    from runtime.inference import Restorer

RestoreFn = Callable[[np.ndarray, int], np.ndarray]  # (uint8 JPEG-decoded image, its quality) -> uint8 restored image


@dataclass(frozen=True)
class ImageFile:
    """A test image by its file: the pool's workers read it where they need it, so memory holds the
    images in flight, not the folder."""
    path: Path
    mode: str | None
    color: bool

    def pixels(self) -> np.ndarray:
        return read_test_image(self.path, self.mode)


def read_test_image(path: Path, mode: str | None) -> np.ndarray:
    """mode None keeps the file's own (L -> gray, RGB -> rgb; a gray photo stored as RGB, three equal
    channels, is gray: the same JPEG, the gray model)."""
    img = read_image(path, mode, min_size=max(8, min_image_side()[0]))
    check_detail(img)
    return img[..., 0].copy() if mode is None and img.ndim == 3 and is_gray(img) else img


def pixels(image: np.ndarray | ImageFile) -> np.ndarray:
    return image.pixels() if isinstance(image, ImageFile) else image


def _is_color(path: Path, mode: str | None) -> bool | Exception:
    try:
        return read_test_image(path, mode).ndim == 3
    except (BadImage, OSError) as exc:
        return exc


def load_test_images(folder: Path, mode: str | None = None) -> tuple[dict[str, ImageFile], list[str]]:
    """The images of a test folder by name, each read once here to check it (read_test_image), on
    threads (Pillow decodes without the GIL). Returns them and a list of 'file: reason' for the
    files skipped."""
    paths, others = image_files(folder)
    images, skipped = {}, [f"{p.name}/: a subfolder (not searched)" if p.is_dir() else f"{p.name}: {not_a_file(p) or 'not an image'}"
                           for p in others]
    with ThreadPoolExecutor(usable_cpus()) as threads:
        checked = threads.map(_is_color, paths, [mode] * len(paths))
        for path, color in zip(paths, checked):
            if path.stem in images:  # results are keyed by name
                skipped.append(f"{path.name}: the set already has an image named {path.stem}")
            elif isinstance(color, Exception):
                skipped.append(f"{path.name}: {color}")
            else:
                images[path.stem] = ImageFile(path, mode, color)
    if not images:
        reasons = f" ({'; '.join(skipped[:2])}{'; ...' if len(skipped) > 2 else ''})" if skipped else ""
        raise DataError(f"{folder} holds no readable images{reasons}")
    return images, skipped


def resaved_jpegs(folder: Path, names, qualities: list[int]) -> list[str]:
    """Notes on test images that are JPEGs at or below a tested quality: compressing such an
    original again at its own quality or above nearly repeats it, so those figures say little."""
    notes = []
    for path in image_files(folder)[0]:
        if path.stem in names and (found := jpeg_quality(path)) and found[0] <= max(qualities):
            notes.append(f"{path.name} is itself a JPEG of quality {found[0]}: its figures at q{found[0]} and above "
                         "compare one JPEG with another")
    return notes


def kind_of(img: np.ndarray | ImageFile) -> str:
    """A test image's kind, and its JPEG's: a color original stays color even where a low quality
    quantizes a faint tint away and the JPEG decodes to three equal channels."""
    return "color" if (img.color if isinstance(img, ImageFile) else img.ndim == 3) else "gray"


def load_models(images: dict[str, np.ndarray | ImageFile], checkpoint: Path | None, device: str, precision: str,
                ensemble: bool) -> dict[str, tuple[Path, Restorer]]:
    """{kind of image: (checkpoint, Restorer)} for the kinds in the folder: the checkpoint given, or
    the shipped model of each kind (as restore picks them), each loaded once."""
    from runtime.inference import Restorer, shipped_model

    paths = {k: checkpoint or shipped_model(k == "color") for k in sorted({kind_of(i) for i in images.values()})}
    loaded = {c: Restorer(c, device, precision, ensemble=ensemble) for c in set(paths.values())}
    return {k: (c, loaded[c]) for k, c in paths.items()}


def by_kind(models: dict[str, tuple[Path, Restorer]]) -> RestoreFn:
    return lambda img, q: models[kind_of(img)][1](img, q)


def model_fields(models: dict[str, tuple[Path, Restorer]]) -> dict:
    """The results' checkpoint and arch: one name where one model restored every image, else one per kind."""
    if not models:
        return {"checkpoint": None, "arch": None}
    per_kind = {k: (str(c), r.meta["arch"]) for k, (c, r) in models.items()}
    if len(set(per_kind.values())) == 1:
        return dict(zip(("checkpoint", "arch"), next(iter(per_kind.values()))))
    return {"checkpoint": {k: c for k, (c, _) in per_kind.items()}, "arch": {k: a for k, (_, a) in per_kind.items()}}


def _jpeg_metrics(args):
    original, q = pixels(args[0]), args[1]
    jpeg = jpeg_roundtrip(original, q)
    return jpeg, image_metrics(original, jpeg)


def _model_metrics(image: np.ndarray | ImageFile, restored: np.ndarray) -> dict[str, float]:
    return image_metrics(pixels(image), restored)


def evaluate(images: dict[str, np.ndarray | ImageFile], qualities: list[int], restore: RestoreFn | None = None,
             workers: int | None = None, keep: int = 0) -> tuple[dict, dict]:
    """Mean metrics per quality: {"10": {"jpeg": {...}, "model": {...}}}, plus per-image values.
    `keep` > 0 also returns the first `keep` images' (original, jpeg, restored) for figures. The pool
    reads the image files, makes the JPEGs and scores the metrics a few images ahead of the model, no
    more: memory holds those few images, not the folder (nor a JPEG and a restored copy of each)."""
    names = sorted(images)
    workers = workers or usable_cpus()
    ahead = 2 * workers  # images in flight
    results, per_image, kept = {}, {}, {}
    with spawned_pool(workers, start_worker, (os.getpid(),)) as pool, \
            tqdm(total=len(qualities) * len(names), unit="img", leave=False, disable=not sys.stderr.isatty(),  # none in a log
                 desc=f"q{qualities[0]}") as bar:  # labelled from its first frame
        for q in qualities:
            bar.set_description(f"q{q}")
            jpegs = deque(pool.submit(_jpeg_metrics, (images[n], q)) for n in names[:ahead])
            rows, kept[q], scoring, unscored = {}, [], {}, deque()
            for i, n in enumerate(names):
                jpeg, jpeg_scores = jpegs.popleft().result()
                rows[n] = {"jpeg": jpeg_scores}
                if i + ahead < len(names):
                    jpegs.append(pool.submit(_jpeg_metrics, (images[names[i + ahead]], q)))
                restored = restore(jpeg, q) if restore is not None else None  # q: as read from the file's tables
                if restored is not None:  # scored by the pool while the model restores the next image
                    scoring[n] = pool.submit(_model_metrics, images[n], restored)
                    unscored.append(scoring[n])
                    if len(unscored) > ahead:  # a fast model waits for the scoring, not to hold every image
                        unscored.popleft().result()
                if len(kept[q]) < keep:
                    kept[q].append((n, pixels(images[n]), jpeg, restored))
                bar.update()
            for n, future in scoring.items():
                rows[n]["model"] = future.result()
            kinds = ["jpeg"] + (["model"] if restore is not None else [])
            results[str(q)] = {k: {m.name: float(np.mean([rows[n][k][m.name] for n in names])) for m in metrics()}
                               for k in kinds}
            per_image[str(q)] = rows
    return results, {"per_image": per_image, "kept": kept}


def format_table(dataset: str, results: dict) -> str:
    """One row per quality: every registered metric of the JPEG input, of the model, and the PSNR gain."""
    ms = metrics()
    has_model = any("model" in r for r in results.values())
    widths = [max(len(m.label), 6) for m in ms]

    def heads(prefix: str) -> str:
        return " ".join(f"{(prefix + m.label) if i == 0 else m.label:>{w + (len(prefix) if i == 0 else 0)}}"
                        for i, (m, w) in enumerate(zip(ms, widths)))

    def cells(values: dict, prefix: str) -> str:
        return " ".join(f"{values[m.name]:{w + (len(prefix) if i == 0 else 0)}.{m.digits}f}"
                        for i, (m, w) in enumerate(zip(ms, widths)))

    head = f"{'q':>4} | {heads('JPEG ')}"
    if has_model:
        head += f" | {heads('model ')} | {'gain dB':>7}"
    lines = [f"{dataset}", head, "-" * len(head)]
    for q, r in results.items():
        line = f"{q:>4} | {cells(r['jpeg'], 'JPEG ')}"
        if "model" in r:
            line += f" | {cells(r['model'], 'model ')} | {r['model']['psnr'] - r['jpeg']['psnr']:+7.2f}"
        lines.append(line)
    return "\n".join(lines)


def write_side_by_side(kept: dict, out_dir: Path) -> list[Path]:
    paths = []
    for q, items in kept.items():
        for name, orig, jpeg, restored in items:
            path = out_dir / f"{name}_q{q}.png"
            atomic_write_bytes(path, side_by_side(orig, jpeg, restored, f"{name} q{q}"))
            paths.append(path)
    return paths


@command
def main(argv=None) -> int:
    import torch

    from runtime.device import add_device_option, check_device, emulated_precision_warning, resolve_precision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", help="data root (default: $JPEG_RESTORE_DATA_ROOT)")
    ap.add_argument("--dataset", default="live1_gray", help="test folder in the data root, or a path: its images in any format Pillow reads "
                    "(PNG, BMP, TIFF, PPM/PGM, WebP, JPEG); other files are named and passed over")
    ap.add_argument("--qualities", default="10,20,30,40", help="comma-separated JPEG qualities, or a range: 5-95:5")
    ap.add_argument("--json", type=output_file, help="write the results here")
    ap.add_argument("--side-by-side", type=Path, help="write original | JPEG | restored PNGs here (of an image over about 30 MP, "
                    "its centre)")
    ap.add_argument("--side-by-side-count", type=int, default=2)
    ap.add_argument("--checkpoint", type=checkpoint_path, help="model checkpoint to evaluate (default: the shipped model); "
                    "a file, or a registered version: models:/NAME@ALIAS, models:/NAME/VERSION")
    ap.add_argument("--jpeg-only", action="store_true", help="only the JPEG baseline, no model")
    add_device_option(ap, default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"], help="inference precision")
    ap.add_argument("--self-ensemble", action="store_true",
                    help="average the model over the 8 rotations and flips of each image (8x the time)")
    ap.add_argument("--log-mlflow", action="store_true", help="log the metrics to the checkpoint's MLflow run")
    args = ap.parse_args(argv)
    keep_freed_memory()
    args.device = check_device(args.device)
    if not args.jpeg_only and (slow := emulated_precision_warning(args.precision, torch.device(args.device))):
        print(f"warning: {slow}", file=sys.stderr)
    qualities = parse_qualities(args.qualities)
    if args.side_by_side_count < 1:
        raise UserError(f"--side-by-side-count must be at least 1, got {args.side_by_side_count}")
    if args.json:  # before minutes of evaluation
        check_output_file(args.json, "--json", json_only=True)
    if args.side_by_side:
        check_output_folder(args.side_by_side)
    if args.log_mlflow:
        resolve_tracking_uri()  # a store that cannot be used is said now, not after the evaluation
    folder = dataset_dir(args.dataset, args.data_root)
    images, skipped = load_test_images(folder)
    models = {} if args.jpeg_only else load_models(images, args.checkpoint, args.device, args.precision, args.self_ensemble)
    if args.log_mlflow and len({c for c, _ in models.values()}) > 1:  # the shipped gray and color models
        raise UserError("--log-mlflow logs to one model's run, and this folder's gray and color images take two "
                        "(the shipped gray and color models): give --checkpoint")
    if args.log_mlflow and models:
        checkpoint, model = next(iter(models.values()))
        if why := unloggable(model.meta.get("mlflow_run_id"), checkpoint.parent):  # said now, not after the evaluation
            raise UserError(f"--log-mlflow: {why}")
    restorer = by_kind(models) if models else None
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    for note in resaved_jpegs(folder, images, qualities):
        print(f"note: {note}", file=sys.stderr)
    keep = args.side_by_side_count if args.side_by_side else 0
    start = time.perf_counter()
    results, extra = evaluate(images, qualities, restore=restorer, keep=keep)
    fields = model_fields(models)
    if isinstance(fields["checkpoint"], dict):
        used = "".join(f", {fields['arch'][k]} from {c} ({k} images)" for k, c in fields["checkpoint"].items())
    else:
        used = f", {fields['arch']} from {fields['checkpoint']}" if models else ""
    title = f"{args.dataset}: {len(images)} images{used}" + (", x8 self-ensemble" if models and args.self_ensemble else "")
    print(format_table(title, results))
    if args.json:
        atomic_write_json(args.json, {"dataset": args.dataset, "images": len(images), "skipped": skipped, **fields,
                                      "self_ensemble": bool(models and args.self_ensemble),
                                      "precision": resolve_precision(args.precision, torch.device(args.device)),  # what ran: not 'auto'
                                      "results": results, "per_image": extra["per_image"]})
    if args.side_by_side:
        write_side_by_side(extra["kept"], args.side_by_side)
    if args.log_mlflow and models:
        name = Path(args.dataset).name + ("_x8" if args.self_ensemble else "")
        logged = {f"{name}_{kind}_{m}_q{q}": v for q, r in results.items() for kind, ms in r.items() for m, v in ms.items()}
        logged[f"{name}_eval_time_s"] = time.perf_counter() - start
        print(log_to_run(model.meta.get("mlflow_run_id"), logged, record_dir=checkpoint.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
