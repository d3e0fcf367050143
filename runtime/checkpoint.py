"""The model checkpoint file (`image_compression_model.pth`), always written atomically and read
with torch.load(weights_only=True): weights + arch + kwargs + channel mode + training config +
validation metrics; enough to rebuild the model anywhere (export, restore, evaluate)."""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from data_pipeline.errors import UserError
from data_pipeline.images import atomic_write_bytes

from .models import architectures, build_model, check_kwargs, meta_model

FORMAT = "jpeg-restore-model/1"
MODES = {"gray": 1, "rgb": 3}
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # BT.601


class CheckpointError(UserError, RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message says which and why."""


def save(obj: dict, path: Path | str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _reason(path: Path, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return (f"it holds a pickled {unsafe.group(1)}, which a weights-only load refuses (unpickling it could run "
                "code); load it only if you trust its source, passing weights_only=False to torch.load, and re-save "
                "its plain tensors")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "an empty file (0 bytes)"
    if head == b"PK\x03\x04":  # torch's zip format, cut short or another program's zip
        detail = re.sub(r"^\[enforce fail at [^]]*\]\s*\.?\s*", "", text).split(". ")[0]
        return f"a zip archive torch cannot read as a checkpoint ({detail or type(exc).__name__})"
    if not head.startswith(b"\x80"):  # every pickle from protocol 2 on starts with PROTO
        return f"neither torch's zip format nor a pickle (starts with {head!r})"
    garbage = re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text)
    return f"not a pickle torch can read ({garbage.group(1).strip() if garbage else text.split('. ')[0] or type(exc).__name__})"


def load(path: Path | str, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():  # a run's output folder, named instead of its model
        inside = path / "image_compression_model.pth"
        raise CheckpointError(f"checkpoint {path} is a folder: name the model file"
                              + (f" ({inside})" if inside.is_file() else ""))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # an old-protocol pickle warns before it fails
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint: {_reason(path, exc)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def model_checkpoint(model: nn.Module, arch: str, kwargs: dict, mode: str, config: dict, metrics: dict, step: int) -> dict:
    return {"format": FORMAT, "arch": arch, "kwargs": dict(kwargs), "mode": mode,
            "channels": MODES[mode], "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": config, "metrics": metrics, "step": step}


def build_checked(ckpt: dict, path) -> nn.Module:
    """The checkpoint's model, built only after its arch, mode, kwargs and every weight shape
    were checked on the meta device (a hostile `width=20000` allocates nothing)."""
    arch, kwargs, mode = ckpt.get("arch"), ckpt.get("kwargs"), ckpt.get("mode")
    if mode not in MODES or ckpt.get("channels", MODES.get(mode)) != MODES.get(mode):
        raise CheckpointError(f"{path}: channel mode {mode!r} with {ckpt.get('channels')} channels is not gray (1) or rgb (3)")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: kwargs must be a dict, got {kwargs!r}")
    bound = ckpt.get("restore_max_quality")
    if bound is not None and not (isinstance(bound, int) and 1 <= bound <= 100):
        raise CheckpointError(f"{path}: restore_max_quality must be a JPEG quality in 1..100, got {bound!r}")
    if arch not in architectures():
        raise CheckpointError(f"{path}: unknown architecture {arch!r}; known: {', '.join(architectures())}")
    try:
        bad = check_kwargs(arch, kwargs)
        if bad:
            raise ValueError(bad)
        shapes = {k: tuple(v.shape) for k, v in meta_model(arch, kwargs, MODES[mode]).state_dict().items()}
    except ValueError as exc:
        raise CheckpointError(f"{path}: cannot rebuild {arch}({kwargs}): {exc}") from None
    state = ckpt.get("state_dict", {})
    have = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    wrong = sorted(k for k in shapes.keys() | have.keys() if shapes.get(k) != have.get(k))
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: weights do not fit {arch}({kwargs}): {k} is {have.get(k)} in the file, "
                              f"{shapes.get(k)} in the model ({len(wrong)} mismatched)")
    model = build_model(arch, channels=MODES[mode], **kwargs)
    load_weights(model, state, path)
    return model


def load_model(path: Path | str, map_location="cpu", expect_arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model of a model checkpoint (eval mode); returns (model, checkpoint without weights)."""
    ckpt = load(path, map_location)
    if {"model", "optimizer", "step"} <= ckpt.keys():  # a trainer's state (train/loop/state.py)
        raise CheckpointError(f"{path} is a training state (step {ckpt['step']}) for --resume, not a model: by default its run's "
                              f"model is {Path(path).parent.parent / 'image_compression_model.pth'}")
    if ckpt.get("format") != FORMAT or "arch" not in ckpt:
        raise CheckpointError(f"{path} is not a jpeg-restore model checkpoint (no {FORMAT!r} format tag)")
    if expect_arch and ckpt["arch"] != expect_arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']} model, expected {expect_arch}")
    model = build_checked(ckpt, path)
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.eval(), meta


def load_weights(model: nn.Module, state_dict: dict, path) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: weights do not fit {type(model).__name__} ({' '.join(lines[1:3])})") from None


def fold_rgb_to_gray(state_dict: dict, model: nn.Module, path) -> dict:
    """An RGB model's weights for the same network in gray: the layer reading the 3 input channels
    reads R = G = B = Y (its kernels summed over them) and the layer writing the 3 output channels
    writes their BT.601 luma, so the gray model computes the luma of the RGB model's output for a
    gray image exactly. Any other shape mismatch is an error."""
    luma, want, folded = torch.tensor(LUMA_WEIGHTS), model.state_dict(), {}
    for key, value in state_dict.items():
        target = want.get(key)
        if target is None or target.shape == value.shape:
            folded[key] = value
        # channel-major: a pixel-unshuffle stem's 3 x r² input (and head's output) channels are R's r², G's, B's
        elif value.dim() >= 2 and value.shape[1] == 3 * target.shape[1] and target.shape[0] == value.shape[0] \
                and target.shape[2:] == value.shape[2:]:
            folded[key] = value.unflatten(1, (3, -1)).sum(1)
        elif value.shape[0] == 3 * target.shape[0] and target.shape[1:] == value.shape[1:]:
            folded[key] = torch.tensordot(luma.to(value), value.unflatten(0, (3, -1)), dims=1)
        else:
            raise CheckpointError(f"{path}: cannot fold the RGB weights into gray: {key} is {tuple(value.shape)}, "
                                  f"the gray model wants {tuple(target.shape)}")
    return folded


def add_quality_planes(state_dict: dict, model: nn.Module, path) -> dict:
    """A blind model's weights for the same network told the quality (cond_channels): the layer
    reading the input gets zero kernels for the extra planes, so the conditioned model starts as
    exactly the blind one and learns from there what the quality is worth; FiLM layers, which the
    blind network lacks, keep their initialisation (the identity)."""
    want = model.state_dict()
    widened = {key: value for key, value in want.items() if key.startswith("film.") and key not in state_dict}
    for key, value in state_dict.items():
        target = want.get(key)
        if target is None or target.shape == value.shape:
            widened[key] = value
        elif value.dim() >= 2 and target.shape[0] == value.shape[0] and target.shape[2:] == value.shape[2:] \
                and target.shape[1] > value.shape[1]:
            widened[key] = torch.cat([value, value.new_zeros(value.shape[0], target.shape[1] - value.shape[1], *value.shape[2:])], 1)
        else:
            raise CheckpointError(f"{path}: cannot add quality planes to the blind weights: {key} is {tuple(value.shape)}, "
                                  f"the conditioned model wants {tuple(target.shape)}")
    return widened


def starting_weights(blob: dict, model: nn.Module, arch: str, kwargs: dict, mode: str, path) -> tuple[dict, str]:
    """The weights of a model checkpoint for a run of (arch, kwargs, mode) to start from, and how they
    were adapted: the same model as is; an RGB model of the same network for a gray run, folded to
    luma; a blind model of the same network for a run told the quality, its planes added unused."""
    want, have = (arch, dict(kwargs), mode), (blob.get("arch"), blob.get("kwargs"), blob.get("mode"))

    def blind(k: dict) -> dict:
        return {key: v for key, v in k.items() if key not in ("cond_channels", "film")}

    from_rgb = have == (*want[:2], "rgb") and mode == "gray"
    from_blind = (kwargs.get("cond_channels", 0) > 0 and isinstance(have[1], dict) and not have[1].get("cond_channels")
                  and (have[0], blind(have[1]), have[2]) == (arch, blind(kwargs), mode))
    if (want != have and not from_rgb and not from_blind) or "state_dict" not in blob:
        raise CheckpointError(f"{path} holds a {have[0]} {have[2]} model {have[1]}, the config asks for {arch} {mode} {kwargs}")
    if from_rgb:
        return fold_rgb_to_gray(blob["state_dict"], model, path), "RGB folded to luma"
    if from_blind:
        return add_quality_planes(blob["state_dict"], model, path), "the quality starts unused (zero kernels, identity FiLM)"
    return blob["state_dict"], ""
