"""Image I/O shared by preparation, loaders and evaluation: reading with validation,
BT.601 luma, Pillow JPEG round trips and atomic writes."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError, WriteError, undo_on_failure

IMAGE_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"}
MODES = ("gray", "rgb")
# Pillow's own guard against decompression bombs warns from 89 MP and raises an error naming no file
# from 179 MP; read_image refuses above that size itself, with the image's size
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None
# Pillow reads a JPEG's EXIF as it opens it and warns of a damaged one without naming the file, once a
# process: only restore uses the EXIF (its orientation), and upright() reports the damage per file.
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)

# MATLAB rgb2ycbcr for uint8: T scaled by 1/255, offset 16, rounded half up. This exact
# arithmetic reproduces ../shared/data/live1_gray from live1_color bit for bit.
_LUMA = np.array([65.481, 128.553, 24.966]) * (1 / 255)


class BadImage(UserError, ValueError):
    """An input file that cannot be used; the message is the reason."""


class UnreadableFolder(UserError):
    """A folder that cannot be listed; `reason` says why (permissions, I/O)."""

    def __init__(self, folder: Path, exc: OSError):
        self.reason = exc.strerror or str(exc)
        super().__init__(f"cannot read folder {folder}: {self.reason}")


def folder_entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted, hidden ones left out; UnreadableFolder when it cannot be listed."""
    try:
        return sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise UnreadableFolder(folder, exc) from None


def image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the images of a folder, its other entries: files that are not images and subfolders, which
    are not searched), both sorted, hidden ones left out: an image has a known suffix or is any other
    file Pillow opens (PPM/PGM, WebP, GIF)."""
    images, others = [], []
    for f in folder_entries(folder):
        is_image = f.is_file() and (f.suffix.lower() in IMAGE_SUFFIXES or _opens_as_image(f))
        (images if is_image else others).append(f)
    return images, others


def list_images(folder: Path) -> list[Path]:
    return image_files(folder)[0]


def _opens_as_image(path: Path) -> bool:
    try:
        with Image.open(path):  # reads the header only
            return True
    except (OSError, ValueError):  # UnidentifiedImageError is an OSError
        return False


def is_gray(img: np.ndarray) -> bool:
    """One channel, or three equal ones: a gray photo stored as RGB (its JPEG decodes to equal
    channels too), which the gray model restores."""
    return img.ndim == 2 or bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())


def rgb_to_luma(rgb: np.ndarray, rows: int = 256) -> np.ndarray:
    """BT.601 studio-range luma (16..235) of an HxWx3 uint8 image, as uint8; float64 arithmetic a
    band of `rows` rows at a time, so a 100-megapixel photo needs megabytes, not gigabytes."""
    out = np.empty(rgb.shape[:2], np.uint8)
    for y0 in range(0, rgb.shape[0], rows):
        band = rgb[y0:y0 + rows].astype(np.float64)
        y = _LUMA[0] * band[..., 0] + _LUMA[1] * band[..., 1] + _LUMA[2] * band[..., 2] + 16
        out[y0:y0 + rows] = np.floor(y + 0.5)
    return out


def read_image(path: Path | str, mode: str | None, min_size: int = 1) -> np.ndarray:
    """Decode a file into uint8 HxW (gray) or HxWx3 (rgb); mode None keeps the file's own.
    Raises BadImage with the reason."""
    path = Path(path)
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:  # before decoding
                raise BadImage(f"too large ({im.width}x{im.height}, {im.width * im.height / 1e6:.0f} MP; at most "
                               f"{MAX_PIXELS / 1e6:.0f} MP, Pillow's guard against decompression bombs: cut it into parts)")
            im.load()  # full decode: catches truncated data that verify() lets through
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and im.format != "MPO":  # a camera's MPO JPEG: the photo, then previews
                raise BadImage(f"has {frames} frames (an animation or a multi-page file); give one image per file")
            src_mode = im.mode
            if src_mode == "1":
                im = im.convert("L")
            elif src_mode in ("P", "PA"):  # a palette's transparent entry becomes alpha, checked below
                im = im.convert("RGBA" if src_mode == "PA" or "transparency" in im.info else "RGB")
            if im.mode in ("RGBA", "LA"):  # an alpha channel that hides nothing is dropped
                if im.getchannel("A").getextrema() != (255, 255):
                    raise BadImage(f"has transparent pixels ({src_mode}), which a JPEG cannot hold")
                im = im.convert(im.mode[:-1])
            if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PPM"):  # 16-bit gray
                arr = np.round(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8)  # Pillow reads 16-bit RGB as 8 too
            elif im.mode in ("L", "RGB"):
                arr = np.asarray(im)
            else:
                raise BadImage(f"unsupported pixel mode {src_mode} (need gray or RGB)")
    except BadImage:
        raise
    except Exception as exc:  # Pillow raises many types for broken files
        raise BadImage(f"not a readable image ({type(exc).__name__}: {exc})") from None
    mode = mode or ("gray" if arr.ndim == 2 else "rgb")
    if arr.ndim == 3 and mode == "gray":
        arr = rgb_to_luma(arr)
    elif arr.ndim == 2 and mode == "rgb":
        raise BadImage("grayscale image, but the dataset mode is rgb")
    h, w = arr.shape[:2]
    if min(h, w) < min_size:
        raise BadImage(f"too small ({w}x{h}, need at least {min_size} px per side)")
    return np.ascontiguousarray(arr)


def check_detail(img: np.ndarray) -> None:
    """Raise BadImage for an image of one flat value (a black frame, a blank page): it has no detail
    to restore, and where a JPEG or a model gets it exactly its PSNR is infinite, which makes the
    mean over a whole training or test set infinite."""
    first = img.reshape(-1, img.shape[2] if img.ndim == 3 else 1)[0]
    if (img == first).all():
        value = int(first[0]) if img.ndim == 2 else tuple(int(v) for v in first)
        raise BadImage(f"flat (every pixel {value}): no detail to restore, and its PSNR can be infinite")


def jpeg_bytes(img: np.ndarray, quality: int) -> bytes:
    """Pillow/libjpeg encoding (IJG tables, 4:2:0 chroma for color) at `quality`."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """The protocol's JPEG input: encode the uint8 original at `quality`, decode it back."""
    return decode_jpeg(jpeg_bytes(img, quality))


def png_bytes(img: np.ndarray, icc_profile: bytes | None = None, exif: bytes | None = None) -> bytes:
    """PNG of a uint8 image; a color profile and EXIF data given are stored with it."""
    buf = io.BytesIO()
    extra = {k: v for k, v in (("icc_profile", icc_profile), ("exif", exif)) if v}
    Image.fromarray(img).save(buf, format="PNG", compress_level=1, **extra)
    return buf.getvalue()


def upright(img: np.ndarray, exif: bytes | None) -> tuple[np.ndarray, bytes | None, str | None]:
    """(the image turned as its EXIF orientation tag says viewers show it, the EXIF without that
    tag, what was wrong with the EXIF if Pillow could not read all of it: the image then stays as
    stored): a camera's JPEG is stored sideways and tagged, a PNG written from its pixels is not."""
    if not exif:
        return img, exif, None
    im = Image.fromarray(img)
    im.info["exif"] = exif
    with warnings.catch_warnings(record=True) as caught:  # Pillow warns "Corrupt EXIF data" without the file's name
        warnings.simplefilter("always")
        turned = ImageOps.exif_transpose(im)
    problem = "; ".join(" ".join(str(w.message).split()).rstrip(".") for w in caught) or None
    return np.asarray(turned), turned.info.get("exif", exif), problem


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # something was written into it
        folder.rmdir()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see a partial file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        in_the_way = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{in_the_way} exists and is not a folder" if in_the_way else exc.strerror or exc
        raise WriteError(f"cannot write {path}: {reason}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def output_file(text: str) -> Path:
    """argparse type of an option naming a file to write: Path() drops a trailing slash, so
    `--out new_folder/` would write a file named new_folder."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} names a folder: name the file to write")
    return Path(text)


def check_output_file(path: Path, option: str, json_only: bool = False) -> None:
    """The file an option names can be written: not a folder, and its folder takes files (checked
    before any work, not after minutes of it). With json_only, a file already there is replaced
    only if it is JSON (earlier results), not notes or code named by mistake."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: name the file to write")
    if json_only and path.is_file() and not _is_json(path):
        raise UserError(f"{option} {path} exists and is not JSON (results this would replace): "
                        f"choose another {option} or move it away")
    check_output_folder(path.parent)


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False


def check_output_folder(out: Path) -> None:
    """The output folder exists (or is made) and takes files: commands check it before any work. The
    folders made go again, if still empty, when the command fails."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    absolute = Path(out).absolute()
    for folder in reversed([p for p in (absolute, *absolute.parents) if not p.exists()]):
        undo_on_failure(lambda folder=folder: _remove_if_empty(folder))  # outermost first: undone last
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write into output folder {out}: {exc.strerror or exc}") from None
