"""A run's data: its source prepared into <out>/prepared on rank 0, or a data.prepared_dir read as
it was prepared; and the fingerprints by which a resumed run notices images changed since its state."""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import replace
from pathlib import Path

from data_pipeline.config import DataConfig
from data_pipeline.prepare import (
    MANIFEST,
    SPLIT_NAMES,
    load_manifest,
    prepare,
    prepare_command,
    prepared_name,
    report_lines,
    split_fingerprints,
)
from data_pipeline.sources import DataError, dataset_dir, refuse_test_set

from .distributed import DistInfo, on_main_rank

log = logging.getLogger(__name__)


def prepared_data(d: DataConfig, out: Path, data_root: str | None, info: DistInfo) -> DataConfig:
    """The data config the run reads: a data.prepared_dir as it is, else the source prepared (on
    rank 0, the others waiting) into <out>/prepared/<source>-<mode>[-tile<T>], its skips in the log."""
    if d.prepared_dir or d.backend == "synthetic":  # a prepared_dir is read, not prepared, by training
        return d
    prepared = out / "prepared" / prepared_name(d.dataset, d.mode, d.tile_size)

    def prepare_source():
        source = dataset_dir(d.dataset, data_root)
        if source.is_dir():  # before preparing it (archives: training_pairs checks what they held)
            refuse_test_set(list(source.iterdir()), source)
        prepare(source, prepared, d.mode, d.qualities, d.val_fraction, d.min_size, progress=sys.stderr.isatty(),
                tile=d.tile_size)
        summary, *skips = report_lines(prepared)
        log.info("%s", summary)
        for line in skips:
            log.warning("%s", line.strip())

    on_main_rank(prepare_source, info)
    return replace(d, prepared_dir=str(prepared))


def take_prepared_settings(d: DataConfig, data_root: str | None) -> None:
    """A data.prepared_dir holds one source split one way: the run records the source, val_fraction,
    min_size and tile_size it was prepared with (what ship and quality_bound read), saying where the
    config differed. Without a manifest there: the command that prepares it."""
    if not (Path(d.prepared_dir) / MANIFEST).is_file():
        try:  # the command names the source by its path: it runs without the data root
            source = dataset_dir(d.dataset, data_root)
        except DataError:
            source = d.dataset
        command = prepare_command(source, d.prepared_dir, d.mode, d.qualities, d.val_fraction, d.min_size, d.tile_size)
        raise DataError(f"no {MANIFEST} in {d.prepared_dir} (data.prepared_dir): prepare it first: {command}, "
                        "or leave data.prepared_dir empty to prepare into <out>/prepared")
    manifest = load_manifest(d.prepared_dir)
    try:
        same_source = dataset_dir(d.dataset, data_root).resolve() == Path(manifest["source"]).resolve()
    except DataError:  # not there (another machine's data root): by name
        same_source = Path(d.dataset).name == Path(manifest["source"]).name
    prepared = {"dataset": d.dataset if same_source else manifest["source"],
                "val_fraction": manifest["val_fraction"], "min_size": manifest["min_size"],
                "tile_size": manifest.get("tile_size", 0)}
    said = [f"data.{k} {getattr(d, k)}" for k, v in prepared.items() if getattr(d, k) != v]
    if said:
        log.warning("%s was prepared from %s with data.val_fraction %s, data.min_size %s, data.tile_size %s: the run "
                    "takes them from there (the config said %s)", d.prepared_dir, manifest["source"], manifest["val_fraction"],
                    manifest["min_size"], prepared["tile_size"], ", ".join(said))
        for key, value in prepared.items():
            setattr(d, key, value)


def check_same_data(d: DataConfig, where: str, saved: dict | None, best_psnr: float, best_path: Path) -> dict | None:
    """The prepared data's fingerprints (split_fingerprints). A resumed run whose held-out images
    changed since a validation (best_psnr finite) stops: its best model's PSNR would not compare;
    other changes are said. `where` is the data as the user named it."""
    if not d.prepared_dir:  # synthetic data
        return None
    now = split_fingerprints(load_manifest(d.prepared_dir), d.limit)
    changed = [split for split in ("train", "val") if saved and saved[split] != now[split]]
    if "val" in changed and math.isfinite(best_psnr):
        count = f"{saved['val'][0]} -> {now['val'][0]} images" if saved["val"][0] != now["val"][0] else "other images"
        raise DataError(f"the held-out images of {where} changed since the run's last state ({count}): its best "
                        f"validation PSNR, {best_psnr:.3f} dB, would not compare. Put the images back as they were, "
                        f"or continue from its weights in a new run: another --out with --set train.init_from={best_path}")
    for split in changed:
        log.warning("the %s images of %s changed since the run's last state (%d -> %d images): it goes on with these",
                    SPLIT_NAMES[split], where, saved[split][0], now[split][0])
    return now
