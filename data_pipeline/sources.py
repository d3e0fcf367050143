"""Where images come from: the user's data root, dataset folders inside it, the official
archives (LIVE IQA release 2, BSDS500, DIV2K, Flickr2K) and the natural images shipped with scikit-image."""
from __future__ import annotations

import os
import re
import tarfile
import zipfile
from pathlib import Path

from .errors import UserError, some
from .images import atomic_write_bytes, folder_entries

DATA_ROOT_ENV = "JPEG_RESTORE_DATA_ROOT"

# Members of the official archives that hold the images we need.
ARCHIVE_LAYOUTS = {
    "live1": re.compile(r"(^|/)refimgs/[^/]+\.bmp$", re.I),  # databaserelease2.zip
    "bsds500": re.compile(r"(^|/)BSDS500/data/images/(train|test|val)/[^/]+\.jpg$", re.I),  # BSR_bsds500.tgz
    "div2k": re.compile(r"(^|/)DIV2K_(train|valid)_HR/[^/]+\.png$", re.I),  # DIV2K_train_HR.zip, DIV2K_valid_HR.zip
    "flickr2k": re.compile(r"(^|/)Flickr2K_HR/[^/]+\.png$", re.I),  # Flickr2K.tar (not its downscaled LR folders)
}
ARCHIVE_NAMES = "LIVE release-2 zip, BSR_bsds500.tgz, DIV2K_{train,valid}_HR.zip or Flickr2K.tar"

# Natural photographs that ship inside scikit-image (no download); synthetic ones are left out.
SKIMAGE_NATURAL = [
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
]

# LIVE1's 29 images (file stems), the test set: never trained on or used to pick a model.
LIVE1_NAMES = frozenset("""bikes building2 buildings caps carnivaldolls cemetry churchandcapitol coinsinfountain dancers
    flowersonih35 house lighthouse2 lighthouse3 manfishing monarch ocean paintedhouse parrots plane rapids sailing1
    sailing2 sailing3 sailing4 statue stream studentsculpture woman womanhat""".split())


class DataError(UserError, RuntimeError):
    """A problem with the user's data that stops the job; the message says what to do."""


def data_root(arg: str | os.PathLike | None = None) -> Path:
    """The data root from an option, else from $JPEG_RESTORE_DATA_ROOT; it must exist."""
    value = arg or os.environ.get(DATA_ROOT_ENV)
    if not value:
        raise DataError(f"no data root: pass --data-root DIR or set {DATA_ROOT_ENV}")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a directory")
    return root


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """A dataset folder: an existing path, or a folder name inside the data root."""
    if name == "skimage":
        return skimage_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"dataset {name} is a file, not a folder of images")
    if path.is_absolute():
        raise DataError(f"dataset folder {name} does not exist")
    folder = data_root(root) / name
    if not folder.is_dir():
        raise DataError(f"dataset {name!r} not found in data root ({folder} is missing)")
    return folder


def skimage_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith(".zip") or name.endswith((".tgz", ".tar.gz", ".tar")))


def extract_archive(archive: Path, dest: Path) -> list[Path]:
    """Extract only the images of a known archive layout into dest (flat, by file name).
    Already extracted files of the same size are kept."""
    members = _archive_members(archive)
    layout = next((k for k, pat in ARCHIVE_LAYOUTS.items() if any(pat.search(m) for m in members)), None)
    if layout is None:
        raise DataError(f"{archive.name}: not a known archive (expected {ARCHIVE_NAMES}); extract it and prepare its folder")
    wanted = [m for m in members if ARCHIVE_LAYOUTS[layout].search(m)]
    out = []
    for member, data_size, read in _iter_members(archive, set(wanted)):
        target = dest / Path(member).name  # flat: never trust paths inside an archive
        if not (target.is_file() and target.stat().st_size == data_size):
            atomic_write_bytes(target, read())
        out.append(target)
    return sorted(out)


def _archive_members(archive: Path) -> list[str]:
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                return [i.filename for i in z.infolist() if not i.is_dir()]
        with tarfile.open(archive) as t:
            return [m.name for m in t.getmembers() if m.isfile()]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive.name}: unreadable archive ({exc})") from None


def _iter_members(archive: Path, wanted: set[str]):
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if info.filename in wanted:
                    yield info.filename, info.file_size, lambda i=info: z.read(i)
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.name in wanted:
                    yield m.name, m.size, lambda m=m: t.extractfile(m).read()


def source_images(source: Path, scratch: Path) -> list[Path]:
    """Image files of a source folder or archive (archives are extracted into scratch)."""
    if not source.exists():
        raise DataError(f"source {source} does not exist")
    if is_archive(source):
        files = extract_archive(source, scratch)
    elif source.is_dir():
        # files that are not images, links to nothing and pipes stay in the list: prepare reports them as skipped
        files = [p for p in folder_entries(source) if not p.is_dir()]
        if source.resolve() == skimage_dir().resolve():
            files = [p for p in files if p.name in SKIMAGE_NATURAL]
    else:
        raise DataError(f"source {source} is neither a folder nor a known archive")
    if not files:
        folders = subfolders(source) if source.is_dir() else []
        unsearched = (f" (its subfolders {some([f'{d.name}/' for d in folders])} "
                      "are not searched: name one of them as the source)") if folders else ""
        raise DataError(f"source {source} holds no images{unsearched}")
    return files


def dangling(path: Path) -> bool:
    """A link whose target was moved or deleted."""
    return path.is_symlink() and not path.exists()


def not_a_file(path: Path) -> str | None:
    """Why an entry of a source folder that is not a regular file cannot be read (a pipe is never
    opened: reading it waits for a writer); None for a file."""
    if path.is_file():
        return None
    if dangling(path):
        return f"a link to {path.readlink()}, which does not exist"
    return "not a regular file (a pipe, socket or device)"


def subfolders(folder: Path) -> list[Path]:
    """The visible subfolders of a source folder: prepare reads the images at its top level only
    (scikit-image's data folder holds package files besides the photographs)."""
    if folder.resolve() == skimage_dir().resolve():
        return []
    return [p for p in folder_entries(folder) if p.is_dir()]


def refuse_test_set(files: list[Path], source: Path) -> None:
    """Training data must not hold LIVE1: five or more of its image names (a folder of one's own
    photos may hold a house.jpg) stop the job."""
    found = sorted({f.stem.lower() for f in files} & LIVE1_NAMES)
    if len(found) >= 5:
        raise DataError(f"source {source} holds {len(found)} of LIVE1's 29 images ({', '.join(found[:3])}, ...): LIVE1 is "
                        "the test set, never trained on or used to pick a model; train on train400 or train_color")
