"""Training throughput: every architecture in a bare loop, the Trainer against that bare loop,
and 1 against 2 processes (torchrun, gloo on CPU).

    python -m train.benchmark [--arch dncnn] [--steps 12] [--json outputs/train_bench.json]
    python -m train.benchmark --loaders --modes gray,rgb --data-root ../shared/data   # loaders beside what a step consumes
    python -m train.benchmark --end-to-end --arch unet --kwargs "{width = 64, levels = 3}" --batch 64 --patch 128 \\
        --dataset train_color --backends resident,torch --data-root ../shared/data   # Trainer + real data vs bare loop
    python -m train.benchmark --end-to-end ... --dataset DIV2K_train_HR --tile 480 --backends torch   # large photos
    python -m train.benchmark --peak   # the device's measured GEMM peak, MFU's yardstick (train.compare --peak-tflops)

All on synthetic batches (batch 32, 64x64 unless --batch / --patch, channels_last, AdamW, L1; --precision auto is bf16
autocast where the device has native bf16, fp32 on other CPUs), so the figures measure the
training step, not the data pipeline (see data_pipeline.benchmark).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline import benchmark as loader_bench
from data_pipeline.backends import backends
from data_pipeline.errors import UserError, command
from data_pipeline.images import atomic_write_json, check_output_file, output_file
from data_pipeline.prepare import MIN_TILE
from data_pipeline.sources import dataset_dir
from data_pipeline.system import keep_freed_memory, usable_cpus
from runtime.device import autocast_for, device_name, emulated_precision_warning, matmul_peak, native_bf16, resolve_precision
from runtime.models import architectures, build_model, build_problem, check_kwargs, macs_per_pixel

from .loop.config import load_config
from .loop.distributed import DistInfo
from .loop.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
BATCH, PATCH = 32, 64


def training_tflops(patches_per_s: float, patch: int, macs_per_pixel: float) -> float:
    """Achieved TFLOP/s of a training step: forward + backward count 6 FLOP per MAC."""
    return patches_per_s * patch**2 * 6 * macs_per_pixel / 1e12


def bare_loop_rate(arch: str, steps: int, device: torch.device, batch: int = BATCH, patch: int = PATCH,
                   kwargs: dict | None = None, precision: str = "auto", compile: bool = False, channels: int = 1) -> float:
    """Patches/s of the minimal loop: forward under autocast (`precision`), L1, backward, AdamW step
    (fused on CUDA, as the Trainer's); `compile` wraps the model in torch.compile (warm-up compiles)."""
    torch.manual_seed(0)
    model = build_model(arch, channels=channels, **(kwargs or {})).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=device.type == "cuda")
    model = torch.compile(model) if compile else model
    x = torch.rand(batch, channels, patch, patch, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.rand_like(x)

    def step():
        with autocast_for(precision, device):
            loss = F.l1_loss(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(2, steps // 4)):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def _synthetic_overrides(arch: str, steps: int, precision: str) -> list[str]:
    return [f"model.arch={arch}", "model.kwargs={}", "data.backend=synthetic", f"data.batch_size={BATCH}",
            f"data.patch_size={PATCH}", "optim.name=adamw", "train.loss=l1", f"train.precision={precision}",
            f"train.max_steps={3 * steps}", f"train.log_every={steps}", f"train.val_every={10**9}",
            f"train.ckpt_every={10**9}", "tracking.enabled=false", "schedule.warmup_steps=0"]


def trainer_rate(arch: str, steps: int, device: torch.device, out: Path, precision: str, extra: list[str] = (),
                 data_root: str | None = None) -> tuple[float, int]:
    """Patches/s of Trainer.fit over its logged windows after the first (warm-up) one: their harmonic
    mean, the aggregate rate of equal-step windows (the arithmetic mean overstates it); and the
    steps of an epoch of its data."""
    cfg = load_config(None, _synthetic_overrides(arch, steps, precision) + list(extra))
    trainer = Trainer(cfg, out, DistInfo(0, 0, 1, device), data_root=data_root)
    try:
        trainer.fit()
    finally:
        trainer.close()
    rates = trainer.history["images_per_s"][1:]
    return len(rates) / sum(1 / r for r in rates), len(trainer.loader)


def processes_rate(arch: str, steps: int, nproc: int, out: Path, precision: str) -> float:
    """Total patches/s of `nproc` processes (torchrun; each its own batch of 32), via MLflow."""
    import mlflow

    uri = f"sqlite:///{out / 'mlflow.db'}"
    overrides = [a for o in _synthetic_overrides(arch, steps, precision) for a in ("--set", o)]
    overrides[overrides.index("tracking.enabled=false")] = "tracking.enabled=true"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    cmd = launcher + [str(REPO / "train" / "main.py"), "--out", str(out / f"p{nproc}"), *overrides,
                      "--set", f"tracking.run_name=p{nproc}"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["jpeg-restore"], filter_string=f"tags.mlflow.runName = 'p{nproc}'",
                             output_format="list")[0]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return sum(rates) / len(rates)


def model_kwargs(text: str, arch: str) -> dict:
    """--kwargs, a TOML inline table of the architecture's arguments, as a dict; anything else is a
    one-line error."""
    try:
        kwargs = tomllib.loads(f"k = {text}")["k"]
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--kwargs must be a TOML inline table like \"{{width = 64, levels = 3}}\": {exc}") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"--kwargs must be a TOML inline table like \"{{width = 64, levels = 3}}\", got {text!r}")
    problem = check_kwargs(arch, kwargs) or build_problem(arch, kwargs)
    if problem:
        raise UserError(f"--kwargs: {problem}")
    return kwargs


def loaders_against_training(args, device: torch.device, precision: str) -> int:
    """Each loader's patches/s and its headroom over what a bare `--arch` training step consumes."""
    kwargs = model_kwargs(args.kwargs, args.arch)
    loader_bench.check_datasets(args.data_root, args.modes.split(","))  # a missing one said before minutes of measuring
    print(f"{device_name(device)}, {os.cpu_count()} cores, q10-40, {args.arch} {kwargs} step in {precision}")
    print(f"{'backend':<28} {'workers':>7} {'mode':>5} {'batch':>5} {'patch':>5} {'patches/s':>10} {'x training':>10} "
          f"{f'range of {args.repeats}':>19}")
    rows, steps = [], []
    for mode in args.modes.split(","):
        prepared = loader_bench.prepare_dataset(args.data_root, mode)
        # the median of --repeats windows: a single one of the torch loader is mostly its workers' cold caches
        measured = loader_bench.measure(prepared, 40, device, workers=args.workers, mode=mode, repeats=args.repeats)
        for batch, patch in loader_bench.SHAPES:
            consumed = bare_loop_rate(args.arch, 3, device, batch=batch, patch=patch, kwargs=kwargs, precision=precision,
                                      channels=1 if mode == "gray" else 3)
            steps.append({"mode": mode, "batch": batch, "patch": patch, "train_step_patches_per_s": consumed})
            print(f"{args.arch + ' train step':<28} {'':>7} {mode:>5} {batch:>5} {patch:>5} {consumed:10.0f}")
            for r in (r for r in measured if (r["batch"], r["patch"]) == (batch, patch)):
                r["x_training"] = r["patches_per_s"] / consumed
                low, high = r["patches_per_s_range"]
                print(f"{r['backend']:<28} {r['workers']:>7} {mode:>5} {batch:>5} {patch:>5} {r['patches_per_s']:10.0f} {r['x_training']:10.1f} "
                      f"{f'{low:.0f}-{high:.0f}':>19}")
        rows += measured
    atomic_write_json(args.json, {"device": str(device), "device_name": device_name(device), "arch": args.arch, "kwargs": kwargs,
                                  "precision": precision, "repeats": args.repeats, "train_steps": steps, "loaders": rows})
    print(f"wrote {args.json}")
    return 0


def end_to_end(args, device: torch.device, precision: str) -> int:
    """The Trainer on real data with each loader backend against the bare loop of the same model,
    batch and patch: how much of the GPU (or CPU) the data path leaves idle."""
    kwargs = model_kwargs(args.kwargs, args.arch)
    dataset_dir(args.dataset, args.data_root)  # a missing one said before the bare loop is timed
    shape = [f"model.kwargs={args.kwargs}", f"data.batch_size={args.batch}", f"data.patch_size={args.patch}"]
    if args.compile:
        shape.append("train.compile=true")
    bare = bare_loop_rate(args.arch, 2 * args.steps, device, args.batch, args.patch, kwargs, precision, args.compile)
    print(f"{args.arch} {kwargs} batch {args.batch} x {args.patch}^2 on {device_name(device)} ({precision}"
          f"{', compiled' if args.compile else ''}): bare loop {bare:.1f} patches/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            data = [f"data.backend={backend}", f"data.dataset={args.dataset}", f"data.workers={args.workers}", "data.qualities=[10, 20, 30, 40]",
                    f"data.tile_size={args.tile}"]
            rate, epoch = trainer_rate(args.arch, args.steps, device, Path(tmp) / backend, precision, shape + data, args.data_root)
            rows.append({"backend": backend, "trainer_patches_per_s": rate, "trainer_over_bare": rate / bare, "steps_per_epoch": epoch})
            print(f"Trainer + {backend:<9} {rate:8.1f} patches/s = {rate / bare:.3f}x the bare loop ({epoch} steps an epoch)", flush=True)
    atomic_write_json(args.json, {"device": str(device), "device_name": device_name(device), "arch": args.arch, "kwargs": kwargs, "batch": args.batch,
                                  "patch": args.patch, "dataset": args.dataset, "tile": args.tile, "precision": precision, "compile": args.compile,
                                  "bare_patches_per_s": bare, "rows": rows})
    print(f"wrote {args.json}")
    return 0


# options that only some benchmarks read; given elsewhere they would be silently ignored
ONLY_WITH = {"kwargs": ("--loaders", "--end-to-end"), "data_root": ("--loaders", "--end-to-end"),
             "workers": ("--loaders", "--end-to-end"), "dataset": ("--end-to-end",), "backends": ("--end-to-end",),
             "compile": ("--end-to-end",), "tile": ("--end-to-end",), "modes": ("--loaders",), "repeats": ("--loaders",),
             "batch": ("the default benchmark", "--end-to-end"),
             "patch": ("the default benchmark", "--end-to-end"), "steps": ("the default benchmark", "--end-to-end"),
             "json": ("the default benchmark", "--loaders", "--end-to-end")}


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dncnn", help="architecture for the trainer and process comparisons")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per measurement window")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--json", type=output_file, default=Path("outputs/train_bench.json"))
    ap.add_argument("--loaders", action="store_true", help="loader patches/s (Train400) beside what a training step consumes")
    ap.add_argument("--data-root", help="with --loaders / --end-to-end (default: $JPEG_RESTORE_DATA_ROOT)")
    ap.add_argument("--end-to-end", action="store_true", help="the Trainer on real data per loader backend vs the bare loop")
    ap.add_argument("--kwargs", default="{}", help="with --loaders / --end-to-end: model kwargs as a TOML inline table")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--patch", type=int, default=PATCH)
    ap.add_argument("--dataset", default="train400", help="with --end-to-end: training dataset (gray luma of color sets)")
    ap.add_argument("--backends", default="resident,torch", help="with --end-to-end: loader backends to compare")
    ap.add_argument("--tile", type=int, default=0,
                    help="with --end-to-end: prepare the dataset's training images in tiles of this side (data.tile_size)")
    ap.add_argument("--modes", default="gray", help="with --loaders: gray (Train400) and/or rgb (train_color)")
    ap.add_argument("--repeats", type=int, default=3, help="with --loaders: windows of 40 batches per loader, one after another: "
                    "the median and the range are shown")
    ap.add_argument("--compile", action="store_true", help="with --end-to-end: torch.compile the bare loop and the Trainer")
    ap.add_argument("--workers", type=int, default=max(1, usable_cpus() - 2), help="torch workers / DALI threads")
    ap.add_argument("--peak", action="store_true", help="only the device's measured GEMM peak in fp32 and bf16, MFU's yardstick "
                    "(train.compare --peak-tflops)")
    args = ap.parse_args(argv)
    chosen = [flag for flag, on in (("--loaders", args.loaders), ("--end-to-end", args.end_to_end), ("--peak", args.peak)) if on]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} are {('two', 'three')[len(chosen) - 2]} benchmarks: run one at a time")
    mode = chosen[0] if chosen else "the default benchmark"
    ignored = [f"--{name.replace('_', '-')}" for name, modes in ONLY_WITH.items()
               if getattr(args, name) != ap.get_default(name) and mode not in modes]
    if ignored:
        raise UserError(f"{' and '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} nothing in {mode}; --help says where each applies")
    if not args.peak:
        check_output_file(args.json, "--json", json_only=True)
    keep_freed_memory()  # as train/main.py runs
    if args.arch not in architectures():
        raise UserError(f"unknown architecture {args.arch!r}; known: {', '.join(architectures())}")
    if min(args.steps, args.batch, args.patch, args.workers, args.repeats) < 1:
        raise UserError(f"--steps, --batch, --patch, --workers and --repeats must be at least 1, got "
                        f"{args.steps}, {args.batch}, {args.patch}, {args.workers} and {args.repeats}")
    if args.tile and args.tile < max(args.patch, MIN_TILE) or args.tile < 0:
        raise UserError(f"--tile must be 0 (whole images) or at least --patch {args.patch} (and {MIN_TILE}), got {args.tile}")
    if not set(args.modes.split(",")) <= set(loader_bench.DATASETS):
        raise UserError(f"--modes takes {', '.join(loader_bench.DATASETS)}, got {args.modes!r}")
    unknown = set(args.backends.split(",")) - set(backends())
    if unknown:
        raise UserError(f"unknown loader backend(s) {', '.join(sorted(unknown))}: choose from {', '.join(backends())}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.peak:
        peak = matmul_peak(str(device))
        print(f"{device_name(device)}: measured peak {peak['fp32'] / 1e3:.3g} TFLOP/s fp32, {peak['bf16'] / 1e3:.3g} TFLOP/s bf16 "
              "(train.compare --peak-tflops takes the runs' precision's)")
        return 0
    precision = resolve_precision(args.precision, device)
    if slow := emulated_precision_warning(precision, device):
        print(f"warning: {slow}", file=sys.stderr)
    if args.loaders:
        return loaders_against_training(args, device, precision)
    if args.end_to_end:
        return end_to_end(args, device, precision)
    print(f"device {device}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch {args.batch}, {args.patch}x{args.patch}, {precision} (native bf16: {native_bf16(device)}), channels_last")
    peak = matmul_peak(str(device))["bf16" if precision in ("bf16", "fp16") else "fp32"] * 1e9
    print(f"measured peak {peak / 1e12:.2f} TFLOP/s ({'bf16' if precision in ('bf16', 'fp16') else 'fp32'}): MFU's yardstick")
    archs = []
    for arch in architectures():
        model = build_model(arch, channels=1)
        row = {"arch": arch, "params": sum(p.numel() for p in model.parameters()),
               "macs_per_pixel": macs_per_pixel(model, 1),
               "bare_patches_per_s": bare_loop_rate(arch, args.steps, device, args.batch, args.patch, precision=precision)}
        row["tflops"] = training_tflops(row["bare_patches_per_s"], args.patch, row["macs_per_pixel"])
        row["mfu"] = row["tflops"] * 1e12 / peak
        archs.append(row)
        print(f"{arch:<12} {row['params'] / 1e6:7.3f} M params {row['macs_per_pixel'] / 1e3:8.1f} k MACs/px "
              f"{row['bare_patches_per_s']:8.1f} patches/s (bare loop) {row['tflops']:7.3f} TFLOP/s MFU {row['mfu']:6.1%}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_loop_rate(args.arch, 2 * args.steps, device, precision=precision)
        trained, _ = trainer_rate(args.arch, args.steps, device, Path(tmp) / "trainer", precision)
        print(f"{args.arch}: Trainer {trained:.1f} vs bare loop {bare:.1f} patches/s = {trained / bare:.3f}x", flush=True)
        skip = "one GPU here" if device.type == "cuda" else None if importlib.util.find_spec("mlflow") else "MLflow is not installed"
        if skip is None:
            one = processes_rate(args.arch, args.steps, 1, Path(tmp), precision)
            two = processes_rate(args.arch, args.steps, 2, Path(tmp), precision)
    if skip is None:
        print(f"{args.arch}: 1 process {one:.1f}, 2 processes (torchrun, gloo) {two:.1f} patches/s = {two / one:.2f}x")
    else:
        one = two = None
        print(f"{args.arch}: 1 against 2 processes skipped ({skip})")
    atomic_write_json(args.json, {"device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                                  "precision": precision, "native_bf16": native_bf16(device),
                                  "batch": args.batch, "patch": args.patch, "archs": archs, "arch": args.arch, "bare_patches_per_s": bare,
                                  "trainer_patches_per_s": trained, "trainer_over_bare": trained / bare,
                                  "one_process_patches_per_s": one, "two_processes_patches_per_s": two})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
