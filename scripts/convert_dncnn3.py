"""The published DnCNN-3 (Zhang et al., TIP 2017) as a checkpoint of this project's `dncnn`, so
`train.evaluate` scores it by the same protocol as our models (README, "Do the LIVE1 gains hold
elsewhere?"):

    git clone https://github.com/cszn/DnCNN && pip install h5py
    python scripts/convert_dncnn3.py DnCNN/model/DnCNN3.mat dncnn3.pth
    python -m train.evaluate --checkpoint dncnn3.pth --dataset DnCNN/testsets/BSD68

DnCNN3.mat is a MatConvNet net saved as MATLAB v7.3 (HDF5): 20 convolutions with their BatchNorm
folded in, ReLUs between them. It outputs the artifact to subtract; `dncnn` adds its body's output
to the input, so the last convolution is negated.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import first_line
from runtime.checkpoint import model_checkpoint, save
from runtime.models import build_model

KWARGS = {"depth": 20, "width": 64, "batch_norm": False}


def read_convs(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight as out x in x kh x kw, bias) of each conv layer, in order."""
    try:
        import h5py  # not a dependency of the project: this script alone reads MATLAB v7.3 files
    except ImportError:
        raise SystemExit("error: reading DnCNN3.mat needs h5py: pip install h5py") from None
    f = h5py.File(path, "r")
    convs = []
    for ref in f["net"]["layers"][:, 0]:
        layer = f[ref]
        if "".join(map(chr, layer["type"][()].ravel())) != "conv":
            continue
        weight, bias = (np.array(f[r]) for r in layer["weights"][:, 0])
        if weight.ndim == 3:  # MATLAB drops a trailing singleton: kh x kw x in for one output channel
            weight = weight[None]
        # MATLAB stores kh x kw x in x out column-major; HDF5 reads it reversed: out x in x kw x kh
        convs.append((np.ascontiguousarray(weight.transpose(0, 1, 3, 2)), bias.ravel()))
    return convs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mat", help="DnCNN3.mat from github.com/cszn/DnCNN (model/)")
    ap.add_argument("out", help="checkpoint to write")
    args = ap.parse_args()
    if not Path(args.mat).is_file():
        raise SystemExit(f"error: {args.mat} {'is a folder: name DnCNN3.mat in it' if Path(args.mat).is_dir() else 'not found'}")
    try:
        convs = read_convs(args.mat)
    except (OSError, KeyError) as exc:  # not HDF5, or not a MatConvNet net
        raise SystemExit(f"error: {args.mat} is not a MatConvNet net saved as MATLAB v7.3: {first_line(exc)}") from None
    model = build_model("dncnn", channels=1, **KWARGS)
    targets = [m for m in model.body if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != len(targets):
        raise SystemExit(f"error: {args.mat} has {len(convs)} conv layers, DnCNN-3 has {len(targets)}")
    with torch.no_grad():
        for i, (conv, (weight, bias)) in enumerate(zip(targets, convs)):
            if tuple(conv.weight.shape) != weight.shape:
                raise SystemExit(f"error: conv {i} of {args.mat} is {weight.shape}, DnCNN-3's is {tuple(conv.weight.shape)}")
            sign = -1.0 if i == len(convs) - 1 else 1.0
            conv.weight.copy_(sign * torch.from_numpy(weight))
            conv.bias.copy_(sign * torch.from_numpy(bias))
    config = {"source": "DnCNN-3, published weights (github.com/cszn/DnCNN, model/DnCNN3.mat)"}
    save(model_checkpoint(model, "dncnn", KWARGS, "gray", config, metrics={}, step=0), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
