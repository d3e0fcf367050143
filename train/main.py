"""Train a JPEG artifact-removal model.

    python train/main.py --config configs/dncnn.toml --data-root ../shared/data --out outputs/dncnn
    torchrun --nproc_per_node=4 train/main.py --config configs/dncnn.toml --out outputs/dncnn
    python train/main.py --config configs/unet.toml --smoke --set optim.lr=2e-4 --set data.batch_size=16

The best model (by validation PSNR) lands in <out>/image_compression_model.pth; the full
training state in <out>/checkpoints/ (--resume continues from the newest). Stopped by a signal
(Ctrl-C, SIGTERM) it saves that state and exits with 128 + the signal's number, as the quickstart does.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/main.py` / `torchrun train/main.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from data_pipeline.errors import ReportedElsewhere, UserError, command  # noqa: E402
from data_pipeline.system import keep_freed_memory  # noqa: E402

# The trainer (torch and all) is imported in the functions that use it: the validation's metric workers
# import this file again (spawn does), 1.6 s and 231 MB a worker with torch, 0.2 s and 30 MB without.


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file in configs/ (default: built-in defaults, DnCNN)")
    ap.add_argument("--data-root", help="folder holding the datasets (default: $JPEG_RESTORE_DATA_ROOT)")
    ap.add_argument("--out", type=Path, default=Path("outputs/run"), help="run outputs: checkpoints, best model, logs")
    ap.add_argument("--resume", action="store_true", help="continue from the newest training state in <out>/checkpoints")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a few images (seconds on CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. --set optim.lr=2e-4 (repeatable)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="cuda: each rank's GPU (LOCAL_RANK)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the config it would train with (the file, --smoke and --set resolved; every key) as TOML and exit")
    return ap.parse_args(argv)


def load_config_once_per_node(args: argparse.Namespace):
    """Every process of a node reads the same files and flags, so a bad config is printed by its
    first (LOCAL_RANK 0) only, not once per rank."""
    from train.loop.config import load_config
    from train.loop.trainer import SMOKE_OVERRIDES

    try:
        return load_config(args.config, (SMOKE_OVERRIDES if args.smoke else []) + args.overrides)
    except UserError as exc:
        if int(os.environ.get("LOCAL_RANK", 0)) > 0:
            raise ReportedElsewhere(str(exc)) from None
        raise


@command
def main(argv=None) -> int:
    from runtime.device import check_device
    from train.loop.config import to_toml
    from train.loop.distributed import cleanup, init_distributed
    from train.loop.trainer import Trainer

    args = parse_args(argv)
    keep_freed_memory()
    rank = int(os.environ.get("RANK", 0))
    # the log is rank 0's: every warning is the same on every rank (the data, config and states they share)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    trainer = None
    try:
        cfg = load_config_once_per_node(args)
        if args.print_config:
            if rank == 0:
                print(to_toml(cfg), end="")
            return 0
        info = init_distributed(cfg.train.ddp_timeout_s, check_device(args.device))
        trainer = Trainer(cfg, args.out, info, resume=args.resume, data_root=args.data_root)
        trainer.fit()
        # stopped by a signal, its state saved: not a finished run (`main.py && export` goes no further)
        return 0 if trainer.finished else 128 + signal.Signals[trainer.stop_signal]
    finally:
        if trainer is not None:
            trainer.close()
        cleanup()


def exit_process(code: int) -> None:
    """Under torchrun, leave without finalizing the interpreter: a gloo worker thread may still be
    freeing the last collective's tensors, which needs the interpreter, and meeting its finalization
    aborts the process ("terminate called without an active exception": 3 of 39 two-process runs
    on 2 CPU cores). The run is over by then: its files written, its MLflow run ended, the group left."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
