"""Originals -> a prepared dataset: lossless originals, Pillow JPEGs per quality, a manifest.

    python -m data_pipeline.prepare train400 --data-root ../shared/data --out prepared/train400-gray

Layout of the output folder:
    original/<name>.png    q<Q>/<name>.jpg    meta/<name>.json (per-file record, for resume)
    manifest.json          report.json (skipped files with reasons)
With --tile T, a training image larger than T is cut into T x T tiles overlapping by half (BasicSR's
sub-images), each its own PNG and JPEGs: original/<name>/<y>_<x>.png, q<Q>/<name>/<y>_<x>.jpg. The
torch and DALI loaders decode a whole file for each patch, so a tile, not a photo of megapixels
(24 photos of 2040x1356, torch loader, 2 workers: 23 -> 270 patches/s). Held-out images stay whole:
validation scores whole images.
Idempotent and resumable: each file is written atomically, a file whose source checksum and
settings match its record is skipped, and bad inputs are skipped and reported. Qualities add up:
a folder keeps those prepared before (the runs trained on them read them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from .errors import UserError, command
from .images import (
    MODES,
    BadImage,
    atomic_write_bytes,
    atomic_write_json,
    check_detail,
    check_output_folder,
    jpeg_bytes,
    png_bytes,
    read_image,
)
from .sources import DataError, dataset_dir, is_archive, not_a_file, source_images, subfolders
from .system import die_with_parent, spawned_pool, usable_cpus

MANIFEST = "manifest.json"
REPORT = "report.json"
MANIFEST_VERSION = 1
IMAGES_PER_WORKER = 200
MB_PER_WORKER = 16
MIN_TILE = 16  # a tile holds at least two 8x8 JPEG blocks a side


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_of(name: str, val_fraction: float) -> str:
    """Deterministic train/val split by a hash of the image name."""
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def _output_intact(out: Path, o: dict | None) -> bool:
    """The prepared file exists with the recorded size and SHA-256 (a same-size corruption is caught)."""
    if not o or not (out / o["path"]).is_file() or (out / o["path"]).stat().st_size != o["bytes"]:
        return False
    return _sha256((out / o["path"]).read_bytes()) == o["sha256"]


def parts(rec: dict) -> list[dict]:
    """The files of a record, each with its "original", "jpeg" (by quality), "height" and "width":
    its tiles, or the record itself for a whole image."""
    return rec.get("tiles") or [rec]


def content_sha(rec: dict) -> str:
    """SHA-256 of the whole image's PNG, tiled or not: two names with one content share it."""
    return rec.get("content_sha256") or rec["original"]["sha256"]


def tile_origins(size: int, tile: int) -> list[int]:
    """Starts of the tiles along a side of `size` px: every tile // 2, and the last flush with the edge."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile // 2)) + [size - tile]


def pool_size(files: list[Path], cap: int) -> int:
    """Workers for preparing `files`: one per IMAGES_PER_WORKER images or MB_PER_WORKER of files,
    whichever gives more, at most `cap`. A spawned worker imports its parent's main module first (a
    training's: torch, 1.3 s); 100 small tiles take 0.2 s in this process, a photo of DIV2K's size 1 s."""
    def size(f: Path) -> int:
        try:
            return f.stat().st_size
        except OSError:  # gone since it was listed: its job reports it
            return 0
    source_mb = sum(map(size, files)) / 2**20
    return min(cap, max(-(-len(files) // IMAGES_PER_WORKER), math.ceil(source_mb / MB_PER_WORKER)))


def _record_is_current(rec: dict, out: Path, src_sha: str, mode: str, qualities: list[int], min_size: int,
                       tile: int) -> bool:
    if rec.get("source_sha256") != src_sha or rec.get("mode") != mode or rec.get("min_size") != min_size:
        return False
    if rec.get("tile_size", 0) != tile:
        return False
    return all(_output_intact(out, o) for part in parts(rec) for o in [part["original"]] + [part["jpeg"].get(str(q)) for q in qualities])


def _prepare_one(src: Path, name: str, out: Path, mode: str, qualities: list[int], min_size: int, tile: int = 0) -> dict:
    """Prepare one image (in tiles of `tile` px if it is larger, 0: whole); returns its record, or {"skip": reason}."""
    try:
        data = src.read_bytes()
    except OSError as exc:
        return {"skip": f"unreadable file ({exc.strerror})"}
    src_sha = _sha256(data)
    meta_path = out / "meta" / f"{name}.json"
    if meta_path.is_file():
        try:
            rec = json.loads(meta_path.read_text())
            if _record_is_current(rec, out, src_sha, mode, qualities, min_size, tile):
                rec["status"] = "kept"
                return rec
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # damaged record: redo the file
    try:
        img = read_image(src, mode, min_size)
        check_detail(img)
    except BadImage as exc:
        meta_path.unlink(missing_ok=True)
        return {"skip": str(exc)}

    def write(rel: str, blob: bytes) -> dict:
        atomic_write_bytes(out / rel, blob)
        return {"path": rel, "sha256": _sha256(blob), "bytes": len(blob)}

    def files(pixels, stem: str) -> dict:
        return {"height": int(pixels.shape[0]), "width": int(pixels.shape[1]),
                "original": write(f"original/{stem}.png", png_bytes(pixels)),
                "jpeg": {str(q): write(f"q{q}/{stem}.jpg", jpeg_bytes(pixels, q)) for q in qualities}}

    rec = {"name": name, "source": src.name, "source_sha256": src_sha, "mode": mode, "min_size": min_size}
    h, w = img.shape[:2]
    if tile and max(h, w) > tile:
        # content_sha256: the whole image's PNG hashed (not written), the key whole images' copies are found by
        rec.update(height=h, width=w, tile_size=tile, content_sha256=_sha256(png_bytes(img)),
                   tiles=[{"y": y, "x": x, **files(img[y:y + tile, x:x + tile], f"{name}/{y}_{x}")}
                          for y in tile_origins(h, tile) for x in tile_origins(w, tile)])
    else:
        rec.update(files(img, name), tile_size=tile)
    atomic_write_json(meta_path, rec)
    rec["status"] = "done"
    return rec


def prepare(source: Path | str, out: Path | str, mode: str = "gray", qualities=(10, 20, 30, 40),
            val_fraction: float = 0.1, min_size: int = 48, workers: int | None = None,
            progress: bool = True, tile: int = 0) -> dict:
    """Prepare `source` (folder or archive) into `out`, training images larger than `tile` px in
    tiles (0: whole); returns the manifest."""
    source, out = Path(source), Path(out)
    if mode not in MODES:
        raise DataError(f"mode must be one of {MODES}, got {mode!r}")
    qualities = sorted({int(q) for q in qualities})
    if not qualities or not all(1 <= q <= 100 for q in qualities):
        raise DataError(f"JPEG qualities must be in 1..100, got {qualities}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tile and tile < MIN_TILE:
        raise DataError(f"tiles must be at least {MIN_TILE} px (or 0: whole images), got {tile}")
    _check_files_are_preparations(out)
    qualities = sorted(set(qualities) | set(_earlier_qualities(out, source, mode, tile)))
    files = source_images(source, out / "extracted")
    out.mkdir(parents=True, exist_ok=True)

    skipped, jobs, seen = [], [], {}
    if source.is_dir():  # the output folder may sit inside the source
        skipped += [{"file": f"{d.name}/", "reason": "a subfolder (not searched: prepare it as a source of its own)"}
                    for d in subfolders(source) if d.resolve() != out.resolve()]
    for f in files:
        name = f.stem
        if reason := not_a_file(f):
            skipped.append({"file": f.name, "reason": reason})
            continue
        if name in seen:
            skipped.append({"file": f.name, "reason": f"duplicate name (also {seen[name]})"})
            continue
        seen[name] = f.name
        jobs.append((f, name))

    workers = pool_size([f for f, _ in jobs], workers or usable_cpus())

    jobs = [(f, name, out, mode, qualities, min_size, tile if split_of(name, val_fraction) == "train" else 0)
            for f, name in jobs]  # held-out images stay whole

    def results():
        if workers <= 1:
            yield from (_prepare_one(*job) for job in jobs)
            return
        with spawned_pool(workers, die_with_parent, (os.getpid(),)) as pool:
            futures = [pool.submit(_prepare_one, *job) for job in jobs]
            yield from (fut.result() for fut in futures)

    records = []
    for (f, *_), rec in tqdm(zip(jobs, results()), total=len(jobs), desc=f"prepare {source.name}",
                            disable=not progress, unit="img"):
        if "skip" in rec:
            skipped.append({"file": f.name, "reason": rec["skip"]})
        else:
            records.append(rec)

    records, copies = without_copies(records)
    skipped += copies
    report = {"source": str(source), "prepared": len(records), "skipped": skipped}
    if not records:
        atomic_write_json(out / REPORT, {**report, "written": 0, "kept": 0})
        first = f": {skipped[0]['file']}: {skipped[0]['reason']}" if skipped else ""
        raise DataError(f"source {source} holds no usable images ({len(skipped)} skipped{first}; all reasons in {out / REPORT})")
    counts = {"done": 0, "kept": 0}
    for r in records:
        counts[r.pop("status")] += 1
        r["split"] = split_of(r["name"], val_fraction)
        for part in parts(r):
            part["jpeg"] = {str(q): part["jpeg"][str(q)] for q in qualities}
    manifest = {
        "version": MANIFEST_VERSION, "source": str(source), "mode": mode, "qualities": qualities,
        "val_fraction": val_fraction, "min_size": min_size, "tile_size": tile,
        "files": sorted(records, key=lambda r: r["name"]),
    }
    report.update(written=counts["done"], kept=counts["kept"])
    atomic_write_json(out / REPORT, report)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def without_copies(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """The records with one image of each content (the first by name), and the others as skips: a
    copy under another name would be split apart, one in training and one in validation."""
    first, kept, copies = {}, [], []
    for r in sorted(records, key=lambda r: r["name"]):
        same = first.setdefault(content_sha(r), r)
        if same is r:
            kept.append(r)
        else:
            copies.append({"file": r["source"], "reason": f"the same pixels as {same['source']} (prepared once: copies "
                                                          "could sit in both training and validation)"})
    return kept, copies


def report_lines(out: Path | str) -> list[str]:
    """What a preparation did, from its report: a summary line, then one line per skipped file."""
    report = json.loads((Path(out) / REPORT).read_text())
    return [f"prepared {report['prepared']} images into {out} ({report['written']} written, {report['kept']} "
            f"already done, {len(report['skipped'])} skipped)"] + [f"  skipped {s['file']}: {s['reason']}" for s in report["skipped"]]


def _check_files_are_preparations(out: Path) -> None:
    """A folder named by mistake (a web app's, with its own manifest.json) keeps its files: a
    manifest or report that is JSON without preparation's keys is not replaced."""
    for name, key in ((MANIFEST, "files"), (REPORT, "skipped")):
        try:
            found = json.loads((out / name).read_bytes())
        except (OSError, ValueError):  # none, or damaged: a preparation's, prepared again
            continue
        if not (isinstance(found, dict) and key in found):
            raise DataError(f"{out / name} was not written by preparation: prepare into another folder")


def _earlier_qualities(out: Path, source: Path, mode: str, tile: int) -> list[int]:
    """The qualities already prepared in `out`, which a preparation keeps (runs trained on them read
    them). A folder holds one source in one mode and tiling: preparing another there would mix their
    files and replace the manifest that earlier runs were trained from."""
    try:
        earlier = load_manifest(out)
    except DataError:  # none yet, or unreadable: nothing to keep
        return []
    if (Path(earlier["source"]).name, earlier["mode"]) != (source.name, mode):  # by name: a data root may move
        raise DataError(f"{out} holds {earlier['source']} prepared in {earlier['mode']} mode: prepare {source} "
                        f"({mode}) into another folder")
    if earlier.get("tile_size", 0) != tile:
        said = lambda t: f"in tiles of {t} px" if t else "in whole images"  # noqa: E731
        raise DataError(f"{out} holds {earlier['source']} {said(earlier.get('tile_size', 0))}: prepare it {said(tile)} "
                        "into another folder")
    return earlier["qualities"]


def load_manifest(prepared: Path | str) -> dict:
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {prepared}: run python -m data_pipeline.prepare first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt ({exc}); re-run python -m data_pipeline.prepare") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path} has manifest version {manifest.get('version')}, expected {MANIFEST_VERSION}")
    return manifest


SPLIT_NAMES = {"train": "training", "val": "held-out"}  # the splits as messages name them


def split_records(manifest: dict, split: str, limit: int = 0) -> list[dict]:
    """The records of one split ('train' or 'val'), the first `limit` of them if given."""
    return [f for f in manifest["files"] if f["split"] == split][:limit or None]


def split_fingerprints(manifest: dict, limit: int = 0) -> dict[str, list]:
    """{split: [image count, SHA-256 over their names and source files' checksums]}: what a run
    trains and validates on, by content, alike on every machine that holds the same source files."""
    return {split: [len(files), _sha256("".join(f"{f['name']}:{f['source_sha256']}\n" for f in files).encode())]
            for split in ("train", "val") for files in [split_records(manifest, split, limit)]}


def prepared_name(source: str | Path, mode: str, tile: int = 0) -> str:
    """The folder name a source is prepared into by training and the benchmarks: <source>-<mode>[-tile<T>]."""
    return f"{Path(source).name}-{mode}{f'-tile{tile}' if tile else ''}"


def prepare_command(source, out, mode: str, qualities, val_fraction: float, min_size: int, tile: int = 0) -> str:
    """The shell command that prepares `source` into `out` with these settings."""
    return shlex.join(["python", "-m", "data_pipeline.prepare", str(source), "--out", str(out), "--mode", mode,
                       "--qualities", ",".join(map(str, qualities)), "--val-fraction", str(val_fraction), "--min-size", str(min_size)]
                      + (["--tile", str(tile)] if tile else []))


def check_files(prepared: Path | str, manifest: dict, records: list[dict], qualities=()) -> None:
    """The records' (of `manifest`) originals and JPEGs at `qualities` are there at their recorded
    sizes (a stat each, nothing read): a folder copied in part, or a file changed since it was
    prepared, is named before training rather than failing its decode mid-run."""
    root, damaged = Path(prepared), []
    for part in (part for rec in records for part in parts(rec)):
        for entry in [part["original"]] + [part["jpeg"][str(q)] for q in qualities]:
            path = root / entry["path"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["bytes"]:
                damaged.append(f"{entry['path']} " + ("is missing" if size is None else f"has {size} bytes, not {entry['bytes']}"))
    if damaged:
        again = prepare_command(manifest["source"], root, manifest["mode"], manifest["qualities"], manifest["val_fraction"],
                                manifest["min_size"], manifest.get("tile_size", 0))
        raise DataError(f"{root}: {len(damaged)} prepared file(s) missing or changed since preparation ({damaged[0]}"
                        f"{', ...' if len(damaged) > 1 else ''}): prepare it again, which redoes only those: {again}")


def parse_qualities(text: str) -> list[int]:
    """'10,20,30,40', or a range with a step, '5-95:5' (both ends included): the JPEG qualities in
    ascending order, each once (prepare, evaluate and decoder_check read --qualities so)."""
    try:
        if "-" in text:
            span, _, step = text.partition(":")
            lo, hi = (int(v) for v in span.split("-"))
            step = int(step or 1)
            if lo > hi or step < 1:
                raise DataError(f"--qualities range goes from low to high by a step of at least 1, got {text!r}")
            qualities = list(range(lo, hi + 1, step))
        else:
            qualities = [int(q) for q in text.split(",") if q.strip()]
    except ValueError:
        raise DataError(f"--qualities must be comma-separated integers or a range like 5-95:5, got {text!r}") from None
    if not qualities or not all(1 <= q <= 100 for q in qualities):
        raise DataError(f"--qualities must be in 1..100, got {text!r}")
    return sorted(set(qualities))


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="dataset folder name in the data root, a folder path, an archive, or 'skimage'")
    ap.add_argument("--out", required=True, type=Path, help="prepared dataset folder")
    ap.add_argument("--data-root", help="data root (default: $JPEG_RESTORE_DATA_ROOT)")
    ap.add_argument("--mode", choices=MODES, default="gray")
    ap.add_argument("--qualities", default="10,20,30,40", help="comma-separated JPEG qualities, or a range: 5-95:5")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--min-size", type=int, default=48, help="smallest accepted side in pixels")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--tile", type=int, default=0,
                    help=f"cut training images larger than this into tiles of this side, overlapping by half (at least "
                         f"{MIN_TILE}; 0, the default: whole images)")
    args = ap.parse_args(argv)
    qualities = parse_qualities(args.qualities)
    if args.min_size < 1 or (args.workers is not None and args.workers < 1):
        raise UserError(f"--min-size and --workers must be at least 1, got {args.min_size} and {args.workers}")
    if args.tile and args.tile < MIN_TILE or args.tile < 0:
        raise UserError(f"--tile must be 0 (whole images) or at least {MIN_TILE}, got {args.tile}")
    check_output_folder(args.out)
    src = Path(args.source)
    if not (is_archive(src) or src.is_dir()):
        src = dataset_dir(args.source, args.data_root)
    prepare(src, args.out, args.mode, qualities, args.val_fraction, args.min_size, args.workers, progress=sys.stderr.isatty(),
            tile=args.tile)
    print("\n".join(report_lines(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
