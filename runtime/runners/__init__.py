"""Inference backends behind one interface, one file each: a runner maps a float NCHW torch tensor
in [0, 1] to the restored tensor, and `runner.restore(x)` handles whole images (tiled).

    runner = make_runner("onnxruntime", "outputs/deploy/model.onnx", device="cpu")

Each runner class says which file it runs (`artifact`: "checkpoint", "onnx", "engine"), why it
cannot run here (`unavailable`), and which variants the latency table times (`variants`).
Adding a backend: one file here with `@register_runner(name)`; restore's --backend choices,
the latency benchmark and to_trt pick it up (export/artifacts.py makes its file, if a new kind)."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch

from data_pipeline.errors import UserError

from ..device import device_name
from ..tiling import restore_tensor

_REGISTRY: dict[str, type["Runner"]] = {}


class RunnerUnavailable(UserError, RuntimeError):
    """This backend cannot run on this machine; the message says why."""


def register_runner(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def runners() -> dict[str, type["Runner"]]:
    """Every registered runner class by name, in registration order of their files."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(_REGISTRY.items(), key=lambda kv: kv[1].order))


class Runner:
    name = "runner"
    artifact = "checkpoint"  # the file it runs: "checkpoint", "onnx" or "engine"
    order = 100  # position in tables and --backend choices
    device = torch.device("cpu")

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        """None if this backend can run on `device` here, else the plain reason."""
        return None

    @classmethod
    def variants(cls, device: str) -> list[tuple[str, dict | str]]:
        """(label, options for open(), or the reason it is not timed) for the latency table."""
        return [(cls.name, {})]

    @classmethod
    def open(cls, path: Path | str, device: str = "cpu", **options) -> "Runner":
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def restore(self, x: torch.Tensor, ensemble: bool = False, tiles_per_call: int = 1, progress=None) -> torch.Tensor:
        """Whole images of any size: tiled above 512 px (and at the tile size of fixed-size models),
        `tiles_per_call` tiles per call; `ensemble` averages over the 8 rotations and flips."""
        return restore_tensor(self, x, ensemble=ensemble, tiles_per_call=tiles_per_call, progress=progress)

    def describe(self) -> dict:
        return {"runner": self.name, "device": str(self.device), "device_name": device_name(self.device)}


def available_runner(name: str, device: str = "cpu") -> type[Runner]:
    """The runner class of backend `name`, or RunnerUnavailable saying why it cannot run on `device` here."""
    found = runners()
    if name not in found:
        raise RunnerUnavailable(f"unknown backend {name!r}; known: {', '.join(found)}")
    why = found[name].unavailable(device)
    if why:
        raise RunnerUnavailable(f"{name}: {why}")
    return found[name]


def make_runner(name: str, path: Path | str, device: str = "cpu", **options) -> Runner:
    """The one factory: a runner of backend `name` over its file (a checkpoint or an exported file)."""
    return available_runner(name, device).open(path, device=device, **options)
