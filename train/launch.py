"""torchrun for the batch scripts (slurm/): the same launcher and arguments, except that a stop by a
signal (Slurm's SIGTERM before the time limit or on preemption, passed on to the workers, which save
their state) ends in one line, not in torchrun's traceback of the signal.

    python -m train.launch --standalone --nproc_per_node 4 train/main.py --config configs/unet.toml
"""
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as stop:
        print(f"torchrun: stopped by {stop.sigval.name}, passed on to the workers", file=sys.stderr)
        sys.exit(128 + int(stop.sigval))
