"""Training configuration: nested dataclasses, loaded from a TOML file in configs/ with dotted
command-line overrides (`--set optim.lr=2e-4`). Unknown keys, ill-typed values, names outside
their choices, non-positive counts and model kwargs that do not fit the architecture are
rejected at load, each with one line naming the key and what is allowed."""
from __future__ import annotations

import dataclasses
import json
import math
import threading
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.config import SEED_MAX, DataConfig
from data_pipeline.errors import UserError
from runtime.device import PRECISIONS
from runtime.models import architectures, build_problem, check_kwargs

from .optim import LOSSES, OPTIMIZERS, SCHEDULES


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message names it."""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _positive(section: str, obj, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0 or (value == 0 and name not in allow_zero):
            need = "0 or more" if name in allow_zero else "positive"
            raise ValueError(f"{section}.{name} must be {need}, got {value}")


@dataclass
class ModelConfig:
    arch: str = "dncnn"
    """Architecture name in the registry (train/models)."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the architecture (channels comes from data.mode)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """'adam', 'adamw' or 'sgd'."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled (adamw) or L2 (adam, sgd) weight decay."""
    momentum: float = 0.9
    """SGD momentum."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this; 0 disables."""

    def __post_init__(self):
        _choice("optim.name", self.name, OPTIMIZERS)
        _positive("optim", self, ("lr", "weight_decay", "momentum", "grad_clip"), ("weight_decay", "momentum", "grad_clip"))


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """'cosine' (warm-up then cosine to min_lr), 'step', 'plateau' or 'constant'."""
    warmup_steps: int = 0
    """Linear warm-up steps (cosine, step, constant)."""
    min_lr: float = 1e-6
    """Final learning rate of the cosine schedule, floor of plateau."""
    step_size: int = 1000
    """Steps between decays of the step schedule."""
    gamma: float = 0.5
    """Decay factor of the step and plateau schedules."""
    patience: int = 3
    """Validations without improvement before plateau decays."""

    def __post_init__(self):
        _choice("schedule.name", self.name, SCHEDULES)
        _positive("schedule", self, ("warmup_steps", "min_lr", "step_size", "gamma", "patience"),
                  ("warmup_steps", "min_lr", "patience"))


@dataclass
class TrainConfig:
    max_steps: int = 10000
    """Optimizer steps in total (with time_budget_s: at most)."""
    time_budget_s: float = 0.0
    """Train for this many seconds of training steps (the compile and data waits included;
    validations, checkpoints and data preparation not) instead of max_steps steps: the step count is
    refitted from the measured rate at every log window so the schedule ends with the budget
    (train/loop/budget.py). 0: max_steps."""
    time_budget_wall: bool = False
    """Count the validations and checkpoints in time_budget_s too: the run ends by the clock (data
    preparation and the last validation still come on top), as a GPU call's hard window needs."""
    loss: str = "l1"
    """'mse', 'l1' or 'charbonnier'."""
    blocking_weight: float = 0.0
    """Add this times the output's blocking effect factor (PSNR-B's penalty: steps across the 8x8
    block boundaries beyond those inside blocks) to the loss. Its scale follows the loss's: with MSE
    (fine-tunes) 0.01 raised PSNR-B 0.22 dB at equal PSNR (the shipped models' last stage) and 0.1
    cost 0.03 dB of PSNR; with L1 (from scratch; its gradient is ~25x MSE's) 0.3 raised PSNR-B
    0.57 dB for 0.002 of PSNR and 1 cost 0.035 (docs/experiments.md). 0: off."""
    precision: str = "auto"
    """'bf16' autocast (CPU and GPU), 'fp16' autocast with GradScaler (GPU), 'fp32', or 'auto': bf16
    where the device computes it natively (recent GPUs; CPUs with AVX-512 BF16/AMX), else fp16 on
    GPUs and fp32 on CPUs (emulated bf16 is several times slower than fp32)."""
    channels_last: bool = True
    """NHWC memory format (faster convolutions on CPU and tensor cores)."""
    compile: bool = False
    """torch.compile the training forward (inductor; fixed patch shape, so one compile). Pays once
    the run is longer than the compile: on GPUs, and on CPUs for models of many small ops (the
    small NAFNet: 1.6x the eager step on a 2-core CPU, after 71 s); validation stays eager."""
    val_every: int = 500
    """Validate every this many steps (and at the end)."""
    ckpt_every: int = 500
    """Save the full training state every this many steps."""
    log_every: int = 50
    """Log training metrics every this many steps."""
    seed: int = 0
    """Seed of model initialisation and data order."""
    best_checkpoint: str = ""
    """Path of the best model; empty means <out>/image_compression_model.pth."""
    ddp_timeout_s: int = 600
    """A rank that waits longer than this on the others fails the job instead of hanging."""
    init_from: str = ""
    """A model checkpoint whose weights start this run (an earlier run's best model: same arch,
    kwargs and mode, or an RGB model for a gray run: its first and last layers are folded to luma);
    the optimizer and schedule start fresh. Ignored when --resume finds a state."""
    grad_accum_steps: int = 1
    """Micro-batches of data.batch_size each rank adds up before an optimizer step: a step takes
    batch_size x ranks x this patches (a 4-GPU run's global batch on one GPU: 4). DDP synchronises
    the gradients once, on the last; BatchNorm normalises each micro-batch on its own."""
    profile_steps: int = 0
    """Trace this many training steps of each session with torch.profiler, from its third step on:
    <out>/profile/rank<R>_steps_<A>-<B>.json for ui.perfetto.dev and a table of the costliest ops
    beside it (train/loop/profiling.py). 0: off."""
    early_stop_patience: int = 0
    """End the run (finished, its best model kept) after this many validations in a row without a
    validation PSNR above the best before them by more than early_stop_min_db. 0: off."""
    early_stop_min_db: float = 0.0
    """The gain in validation PSNR (dB) that counts as better for early_stop_patience."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (e.g. 0.999: about the last 1000 steps,
    fewer early in the run) and validate, save and ship it instead of the raw weights
    (train/loop/ema.py). 0: off."""

    def __post_init__(self):
        _choice("train.loss", self.loss, tuple(LOSSES))
        _choice("train.precision", self.precision, PRECISIONS)
        _positive("train", self, ("max_steps", "time_budget_s", "val_every", "ckpt_every", "log_every", "ddp_timeout_s", "seed",
                                  "blocking_weight", "grad_accum_steps", "profile_steps", "early_stop_patience", "early_stop_min_db"),
                  ("seed", "time_budget_s", "blocking_weight", "profile_steps", "early_stop_patience", "early_stop_min_db"))
        if self.seed > SEED_MAX:
            raise ValueError(f"train.seed must be in 0..{SEED_MAX}, got {self.seed}")
        if self.ddp_timeout_s > threading.TIMEOUT_MAX:
            raise ValueError(f"train.ddp_timeout_s must be at most {threading.TIMEOUT_MAX:.0f}, got {self.ddp_timeout_s:g}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.time_budget_wall and not self.time_budget_s:
            raise ValueError("train.time_budget_wall needs a train.time_budget_s")


@dataclass
class TrackingConfig:
    experiment: str = "jpeg-restore"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty means <arch>-<name of the --out folder>."""
    tracking_uri: str = ""
    """MLflow store; empty means $MLFLOW_TRACKING_URI, else SQLite in mlruns/."""
    enabled: bool = True
    """Log to MLflow (rank 0 only)."""
    offline: bool = False
    """Record the run to <out>/mlflow_record.jsonl instead of a store (automatic where MLflow is not
    installed); `python -m train.import_run <out>` puts it into the store later."""
    tags: dict = field(default_factory=dict)
    """Extra run tags, e.g. the sweep id, array index and grid point (set by slurm/sweep.sh)."""
    timeout_s: float = 120.0
    """Longest wait for one call to the store (MLflow's own retries take minutes, a server that never
    answers 20): at the start, an error; during the run, the rest goes to <out>/mlflow_record.jsonl
    (train.import_run adds it to the run). Keep it under train.ddp_timeout_s: the other ranks wait."""

    def __post_init__(self):
        _positive("tracking", self, ("timeout_s",))
        if self.timeout_s > threading.TIMEOUT_MAX:  # the longest wait a thread takes (292 years)
            raise ValueError(f"tracking.timeout_s must be at most {threading.TIMEOUT_MAX:.0f}, got {self.timeout_s:g}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _check_value(path: str, value, hint):
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):  # the sections' range checks (x < 0) let nan through
        raise ConfigError(f"{path} must be a finite number, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint) or (object,)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_check_value(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if hint in (int, float, str, bool, dict) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{path} must be of type {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known in {prefix.rstrip('.') or 'config'}: {', '.join(names)})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, hint)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def _parse_override(item: str) -> tuple[list[str], object]:
    key, sep, raw = item.partition("=")
    if not sep or not all(part.strip() for part in key.split(".")):  # no '=', or an empty key or part
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip().split("."), value


def read_toml(path: str | Path, what: str = "config file") -> dict:
    try:
        return tomllib.loads(Path(path).read_bytes().decode("utf-8-sig"))  # UTF-8, with a BOM as Windows editors write it
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML (not UTF-8 text: byte {exc.start} is "
                          f"{exc.object[exc.start]:#04x})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML ({exc})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a TOML file (or defaults) with dotted overrides applied on top."""
    data: dict = read_toml(path) if path else {}
    if "configs" in data:  # the key every sweep file has
        raise ConfigError(f"{path} is a sweep file, not a training config: its tasks run with SWEEP_FILE={path} sbatch "
                          f"slurm/sweep.sh (python -m train.sweep --sweep {path} list names them)")
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = from_dict(Config, data)
    validate_model_kwargs(cfg.model)
    planes = cfg.model.kwargs.get("cond_channels", 0)
    if cfg.data.quality_plane != (planes == 1):
        raise ConfigError(f"data.quality_plane = {str(cfg.data.quality_plane).lower()} needs model.kwargs.cond_channels = "
                          f"{1 if cfg.data.quality_plane else 0} (the quality plane is one extra input), got {planes}")
    if cfg.model.kwargs.get("film") and not cfg.data.quality_plane:
        raise ConfigError("model.kwargs.film = true modulates by the quality: it needs data.quality_plane = true "
                          "and model.kwargs.cond_channels = 1")
    if cfg.train.blocking_weight and cfg.data.patch_size < 9:  # its steps across boundaries over none: nan
        raise ConfigError(f"train.blocking_weight measures the steps across 8x8 block boundaries: it needs "
                          f"data.patch_size of at least 9 (a boundary each way), got {cfg.data.patch_size}")
    bad = build_problem(cfg.model.arch, cfg.model.kwargs, cfg.data.channels)
    if bad:
        raise ConfigError(f"model.kwargs: {bad}")
    return cfg


def validate_model_kwargs(model: ModelConfig) -> None:
    if model.arch not in architectures():
        raise ConfigError(f"model.arch must be one of {', '.join(architectures())}, got {model.arch!r}")
    bad = check_kwargs(model.arch, model.kwargs)
    if bad:
        raise ConfigError(f"model.kwargs.{bad}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)  # str, int, float, bool: JSON and TOML spell them alike


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, loadable again with `--config`."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
