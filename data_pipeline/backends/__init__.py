"""Registry of loader backends, one file each: `@register_backend(name)` on a class with
`unavailable()` (None, or why it cannot run here), `needs_files` (False: no prepared dataset) and
`unfit(pairs, cfg)` (None, or why `auto` passes it over for this dataset) and
`source(pairs, cfg, rank, world_size, device)` -> an object whose `batches(epoch, start)` yields
(input, target) batches, uint8 or float, NCHW.

Adding a backend: one file here; data.backend's choices, `auto`, the loader factory and the
loader benchmark pick it up."""
from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[str, type] = {}


def register_backend(name: str, order: int = 100):
    def wrap(cls):
        cls.name, cls.order = name, order
        _REGISTRY[name] = cls
        return cls
    return wrap


def backends() -> dict[str, type]:
    """Every registered backend class by name, in order (the first available is `auto`'s choice)."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(_REGISTRY.items(), key=lambda kv: kv[1].order))


class Backend:
    name, order = "backend", 100
    needs_files = True  # reads the prepared dataset
    auto = True  # a candidate for data.backend = "auto"

    @classmethod
    def unavailable(cls) -> str | None:
        return None

    @classmethod
    def unfit(cls, pairs, cfg) -> str | None:
        """Why `auto` should not pick this backend for these pairs (None: it may)."""
        return None

    def close(self) -> None:
        """Ends what the backend runs beside its caller (worker processes) now, not when it is collected."""
