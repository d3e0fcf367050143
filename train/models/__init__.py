"""Registry of architectures: one file per architecture, each registered by name."""
from __future__ import annotations

import importlib
import pkgutil

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        cls.arch = name
        return cls
    return wrap


def _load_all():
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def architectures() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def build_model(arch: str, **kwargs) -> nn.Module:
    _load_all()
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[arch](**kwargs)


def macs_per_pixel(model: nn.Module, channels: int, size: int = 64) -> float:
    """Multiply-accumulates per output pixel of one forward pass (torch's FLOP counter / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, size, size, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() / 2 / size**2
