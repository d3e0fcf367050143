"""Registry of architectures: one file per architecture, each registered by name with the tiny
settings that tests build it with (`@register("unet", tiny={...})`).

Adding an architecture: one file here with `@register(name, tiny=...)`; the registry, config
checks, shape/ONNX tests and the benchmark pick it up. Architectures with a `cond_channels`
argument can take the JPEG quality as an extra input plane (data.quality_plane): the input has
channels + cond_channels planes, the output and the global residual keep `channels`."""
from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import warnings

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}
TINY: dict[str, dict] = {}  # name -> kwargs of a seconds-to-train instance, for tests


def register(name: str, tiny: dict | None = None):
    def wrap(cls):
        _REGISTRY[name] = cls
        TINY[name] = dict(tiny or {})
        cls.arch = name
        return cls
    return wrap


def _load_all():
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "common":
            importlib.import_module(f"{__name__}.{mod.name}")


def architectures() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def tiny_kwargs(arch: str) -> dict:
    _load_all()
    return dict(TINY[arch])


def arguments(arch: str) -> dict[str, inspect.Parameter]:
    """The architecture's keyword arguments (without `channels`, which the data mode sets)."""
    _load_all()
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(_REGISTRY))}")
    params = inspect.signature(_REGISTRY[arch]).parameters
    return {k: p for k, p in params.items() if k != "channels"}


# no architecture here comes near so many layers, blocks or levels; depth 99999999999 filled the
# memory building its layers to check them (10000 layers: 3.5 s, 0.3 GB on the meta device). A width
# too large fails at once, or as more than the memory holds, with its parameter count.
MAX_COUNT = 10_000


def is_count(key: str) -> bool:
    """A kwarg that repeats layers: depth, levels, groups, blocks, enc_blocks, middle_blocks."""
    return key in ("depth", "levels", "groups") or key.endswith("blocks")


def check_kwargs(arch: str, kwargs: dict) -> str | None:
    """None if `kwargs` fit the architecture's signature (names and the types of the defaults),
    else the reason, naming the key."""
    params = arguments(arch)
    for key, value in kwargs.items():
        if key not in params:
            return f"{key} is not an argument of {arch} (allowed: {', '.join(params)})"
        counts = value if isinstance(value, (list, tuple)) else [value]
        if is_count(key) and any(isinstance(n, int) and not isinstance(n, bool) and n > MAX_COUNT for n in counts):
            return f"{key} must be at most {MAX_COUNT}, got {value!r}"
        default = params[key].default
        if default is inspect.Parameter.empty or default is None:
            continue
        want = type(default)
        ok = isinstance(value, (list, tuple)) if want in (list, tuple) else \
            isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else \
            isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if not ok:
            return f"{key} must be of type {want.__name__} like its default {default!r}, got {value!r}"
        if any(isinstance(n, int) and not isinstance(n, bool) and n < 0 for n in counts):
            return f"{key} must be 0 or more, got {value!r}"
        if any(isinstance(n, float) and not math.isfinite(n) for n in counts):
            return f"{key} must be a finite number, got {value!r}"
    return None


def meta_model(arch: str, kwargs: dict, channels: int = 1) -> nn.Module:
    """The architecture built from `kwargs` on the meta device (nothing allocated, a width of 20000
    included); ValueError saying why in one line when it cannot be built or has an empty layer."""
    import torch

    text = f"{arch}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-sized layers warn
            model = build_model(arch, channels=channels, **kwargs)
    except Exception as exc:  # constructors fail in many ways on impossible sizes
        raise ValueError(f"{text} cannot be built: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    empty = next((name for name, p in model.named_parameters() if p.numel() == 0), None)
    if empty:
        raise ValueError(f"{text} cannot be built: layer {empty} would be empty (a width or count of 0)")
    return model


def build_problem(arch: str, kwargs: dict, channels: int = 1) -> str | None:
    """None if meta_model builds, else why."""
    try:
        meta_model(arch, kwargs, channels)
    except ValueError as exc:
        return str(exc)
    return None


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


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """The model for inference: every BatchNorm right after a convolution in an nn.Sequential folded
    into that convolution's weights (torch's fuse_conv_bn_eval) and replaced by an identity, a pass
    over the features fewer. For fp32 inference: the same outputs to float rounding, the shipped U-Net's
    512² 3-6% faster on a 2-core AMX Xeon. Not for bf16 (-15% there): the folded shift then rounds to
    bf16 with the weights, and the quickstart's model moved 0.01 dB of PSNR from fp32 where unfolded
    bf16 stays within 0.001. Changes `model` in place (eval mode) and returns it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, norm = seq[i], seq[i + 1]
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(norm, nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose2d))
                seq[i + 1] = nn.Identity()
    return model
