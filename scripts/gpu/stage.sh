#!/usr/bin/env bash
# Stage what a GPU-machine session carries, into .gpu/ (git-ignored). Run here,
# once per checkout: bash scripts/gpu/stage.sh [DATA_ROOT] (ORT_GPU=1 also stages onnxruntime-gpu; DATA_ONLY=1 the data alone). What each call carries: scripts/gpu/README.md.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
DATA=${1:-../shared/data}
PART_MB=${PART_MB:-40}  # the checkout travels too (26 MiB in 2026-12): 64 MiB a call in all (scripts/gpu/fits.sh)
mkdir -p .gpu/data .gpu/wheels .gpu/parts
for d in train400 live1_gray train_color live1_color; do
    [ -d ".gpu/data/$d" ] || cp -r "$DATA/$d" .gpu/data/
done
# train_color in two halves (hard links), for a call whose checkout leaves no room for all of it (a larger shipped model)
if [ ! -d .gpu/data_b/train_color ]; then
    mkdir -p .gpu/data_a/train_color .gpu/data_b/train_color
    half=a
    for f in .gpu/data/train_color/*; do
        ln -f "$f" ".gpu/data_$half/train_color/"
        [ $half = a ] && half=b || half=a
    done
fi
if [ "${DATA_ONLY:-0}" = 1 ]; then  # enough for the plans that train and evaluate without DALI (plan D)
    du -sh .gpu/data/* .gpu/data_?/* | sed 's/^/  /'
    echo "staged the data (DATA_ONLY=1: no DALI parts)"
    exit 0
fi
# DALI for Python 3.12 and what the GPU machine's image lacks (its pip list: scripts/gpu/README.md)
WHEELS="nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.3.2.43
        astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/wheels $WHEELS 2>&1 | grep -v "^WARNING: Location" || true
if [ ! -e .gpu/parts/dalisite.txz.00 ]; then  # the wheels unpacked (installing a wheel is unzipping it), without
    site=$(mktemp -d)                          # other Pythons' extension modules, headers and tools: 160 MiB in xz, 4 parts
    for w in .gpu/wheels/*.whl; do unzip -q -o "$w" -d "$site"; done
    find "$site" -name '*cpython-3*.so' ! -name '*cpython-312-*' -delete
    rm -rf "$site"/nvidia/dali/include "$site"/nvidia/libnvcomp/bin "$site"/nvidia/libnvcomp/include "$site"/nvidia/nvimgcodec/include
    tar cf - -C "$site" . | xz -9e -T0 > .gpu/dalisite.txz
    split -d -b "${PART_MB}M" .gpu/dalisite.txz .gpu/parts/dalisite.txz. && rm -rf "$site" .gpu/dalisite.txz .gpu/parts/dali.tar.*
fi
if [ "${ORT_GPU:-0}" = 1 ] && [ ! -e .gpu/parts/ortsite.txz.00 ]; then  # onnxruntime-gpu (CUDA 13 build), unpacked
    mkdir -p .gpu/wheels-ort
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .gpu/wheels-ort onnxruntime-gpu==1.31.1 2>&1 | grep -v "^WARNING: Location" || true
    site=$(mktemp -d)
    unzip -q -o .gpu/wheels-ort/onnxruntime_gpu-*.whl -d "$site"
    tar cf - -C "$site" . | xz -9e -T0 > .gpu/ortsite.txz
    split -d -b "${PART_MB}M" .gpu/ortsite.txz .gpu/parts/ortsite.txz. && rm -rf "$site" .gpu/ortsite.txz
fi
du -sh .gpu/data/* .gpu/data_?/* .gpu/parts/* | sed 's/^/  /'
echo "staged; carry one line of scripts/gpu/README.md per call"
