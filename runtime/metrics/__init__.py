"""Registry of image-quality metrics, per the evaluation protocol in the data README: one file per
metric, `@register_metric(name, label, ...)` on a function (uint8 reference, uint8 output) -> float.

Validation, evaluation, the comparison table and MLflow logging iterate this registry, so adding
a metric is one file here plus its test. Metrics go over an image a band of rows at a time
(row_bands), so a large photo takes buffers of a band, not copies of the photo, in each process
that scores."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool = True
    digits: int = 2  # decimals in tables
    order: int = 100  # column order in tables
    min_side: int = 1  # the smallest image side it is defined on


_REGISTRY: dict[str, Metric] = {}
BAND_PIXELS = 1 << 18  # a quarter megapixel of rows: float64 buffers of 2 MB


def row_bands(height: int, width: int, start: int = 0, stop: int | None = None) -> list[slice]:
    """Consecutive slices of about BAND_PIXELS pixels' rows that cover rows start..stop."""
    stop = height if stop is None else stop
    rows = max(1, BAND_PIXELS // width)
    return [slice(top, min(top + rows, stop)) for top in range(start, stop, rows)]


def squared_error_sum(ref: np.ndarray, out: np.ndarray) -> int:
    """The exact sum of squared differences of two uint8 images (what a float64 sum of them gives too:
    every partial sum is an integer below 2^53)."""
    if ref.shape != out.shape:
        raise ValueError(f"images of shapes {ref.shape} and {out.shape} do not compare")
    return sum(int(np.square(ref[rows].astype(np.int32) - out[rows]).sum(dtype=np.int64)) for rows in row_bands(*ref.shape[:2]))


def register_metric(name: str, label: str, higher_is_better: bool = True, digits: int = 2, order: int = 100,
                    min_side: int = 1):
    def wrap(fn):
        _REGISTRY[name] = Metric(name, label, fn, higher_is_better, digits, order, min_side)
        return fn
    return wrap


def metrics() -> list[Metric]:
    """Every registered metric, in table order."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def get(name: str) -> Metric:
    found = {m.name: m for m in metrics()}
    if name not in found:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(found)}")
    return found[name]


def min_image_side() -> tuple[int, str]:
    """The smallest image side every metric is defined on, and the metric that needs it."""
    needs = max(metrics(), key=lambda m: m.min_side)
    return needs.min_side, needs.label


def image_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Every metric of one restored image against its original (uint8 HxW or HxWx3)."""
    return {m.name: float(m.fn(ref, out)) for m in metrics()}
