#!/usr/bin/env bash
# One call of the lent GPU machine: bash scripts/gpu/call.sh "STEP ARGS" ["STEP ARGS" ...]
# Steps (scripts/gpu/README.md has the call sequence): env, loaders, e2e [compile], archs,
# install-dali, install-ort, dali, dali-loaders, train NAME MINUTES CONFIG [--set k=v ...],
# bgtrain NAME SECONDS CONFIG [--set k=v ...], bgsweep SWEEP_FILE, progress, waittrain, eval NAME, bound NAME,
# latency [NAME] [SHAPES], restore12mp, pack NAME [nomodel].
# Runs, results, installed wheels, and the data and wheel parts carried in .gpu/ (gone there at the
# next call: copied to $WORK first) live under $WORK (/tmp/jr), which stays while the machine is
# warm (30 s after a call). Every call ends by packing
# $WORK/results (JSON, tables) into $OUT. GPU_DRY_RUN=1 rehearses every step on a CPU with tiny settings.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set by the device tool: results come back from there}
WORK=${GPU_WORK:-/tmp/jr}
DATA=$WORK/data
mkdir -p "$WORK/runs" "$WORK/results" "$WORK/data" "$WORK/parts" "$OUT"
# A call's carried paths are gone in the next call: keep what this one carried under $WORK
for carried in .gpu/data .gpu/data_*; do  # -n: never overwrite; .gpu/data_* hold parts of a folder too large for one call
    [ -d "$carried" ] && cp -rn "$carried/." "$DATA/" 2>/dev/null
done
[ -d .gpu/parts ] && cp -n .gpu/parts/* "$WORK/parts/" 2>/dev/null
exec > >(tee -a "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD
PY=python3
if [ "${GPU_DRY_RUN:-0}" = 1 ]; then
    KW="{width = 8, levels = 2}"; WORKERS=2; BATCH=8; PATCH=32; STEPS=4; DEVICE=cpu
    TRAIN_LIMIT=(--set train.max_steps=6 --set train.val_every=3 --set train.ckpt_every=3 --set data.limit=12
                 --set data.batch_size=8 --set data.patch_size=32 --set model.kwargs.width=8)
    SWEEP_LIMIT=(--set train.time_budget_s=4 --set train.log_every=2 --set data.limit=4 --set data.batch_size=4 --set data.patch_size=32)
    SHAPES=64x64x1,64x64x2
else
    KW="{width = 64, levels = 3}"; WORKERS=14; BATCH=64; PATCH=128; STEPS=50; DEVICE=cuda
    TRAIN_LIMIT=(); SWEEP_LIMIT=(); SHAPES=512x512x1,512x512x8
fi
has_dali() { $PY -c "import nvidia.dali" 2>/dev/null; }
log() { echo "== $(date +%T) $*"; }

step_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    $PY -m train.benchmark --peak  # MFU's yardstick on this GPU (train.compare --peak-tflops), before anything trains
    du -sh "$DATA"/* .gpu/parts 2>/dev/null
    git rev-parse HEAD 2>/dev/null || true
}
step_loaders() {  # every backend's patches/s beside the U-Net w64/l3 training step
    local modes=gray; [ -d "$DATA/train_color" ] && modes=gray,rgb
    $PY -m train.benchmark --loaders --modes $modes --arch unet --kwargs "$KW" --workers $WORKERS \
        --data-root "$DATA" --json "$WORK/results/loaders$(has_dali && echo _dali).json"
}
step_dali-loaders() {  # the dali backend alone (after install-dali; the other backends ran in `loaders`)
    $PY -m data_pipeline.benchmark --backends dali --modes gray,rgb --workers $WORKERS --data-root "$DATA" \
        --json "$WORK/results/loaders_dali_only.json"
}
step_e2e() {  # [compile] [BACKENDS]: Trainer on BSDS luma against the bare loop, U-Net w64/l3, batch 64 x 128^2
    local backends=resident,torch extra=() name=e2e
    has_dali && backends=resident,dali,torch
    [ "${1:-}" = compile ] && extra=(--compile) && name=e2e_compile && shift
    [ -n "${1:-}" ] && backends=$1 && name=${name}_${1//,/_}
    $PY -m train.benchmark --end-to-end --arch unet --kwargs "$KW" --batch $BATCH --patch $PATCH --steps $STEPS \
        --dataset train_color --backends $backends --workers $WORKERS --data-root "$DATA" "${extra[@]}" \
        --json "$WORK/results/$name.json"
}
step_archs() {  # every architecture's bare training step and MFU at the training shape
    $PY -m train.benchmark --steps $((STEPS / 2 + 2)) --batch $BATCH --patch $PATCH --json "$WORK/results/archs.json"
}
step_install-dali() {  # the unpacked DALI wheels (stage.sh), xz parts carried one per call
    mkdir -p /tmp/site && cat "$WORK"/parts/dalisite.txz.* | xz -dc -T0 | tar xf - -C /tmp/site || return 1
    export PYTHONPATH=/tmp/site:$PWD
    $PY -c "import nvidia.dali as d; print('DALI', d.__version__)"
}
step_install-ort() {  # onnxruntime-gpu, unpacked (stage.sh), ahead of the image's CPU onnxruntime on PYTHONPATH
    mkdir -p /tmp/site && cat "$WORK"/parts/ortsite.txz.* | xz -dc -T0 | tar xf - -C /tmp/site || return 1
    export PYTHONPATH=/tmp/site:$PWD
    $PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
}
step_dali() {  # nvJPEG and the GPU JPEG imitation against Pillow/libjpeg, gray and color
    $PY -m data_pipeline.decoder_check --data-root "$DATA" --dataset live1_gray --device $DEVICE --json "$WORK/results/decoder_gray.json"
    [ ! -d "$DATA/live1_color" ] && log "no live1_color carried: gray only" && return 0
    $PY -m data_pipeline.decoder_check --data-root "$DATA" --dataset live1_color --device $DEVICE --json "$WORK/results/decoder_color.json"
}
step_train() {  # NAME MINUTES CONFIG [--set k=v ...]: resumes NAME; SIGTERM at MINUTES saves the state
    local name=$1 minutes=$2 config=$3; shift 3
    timeout -s TERM -k 120 "${minutes}m" $PY train/main.py --config "$config" --data-root "$DATA" --out "$WORK/runs/$name" \
        --resume --set tracking.offline=true --set "tracking.run_name=$name" "${TRAIN_LIMIT[@]}" "$@"
    local rc=$?; [ $rc = 124 ] && rc=0  # stopped by the time limit, state saved
    return $rc
}
step_bgtrain() {  # NAME SECONDS CONFIG [--set k=v ...]: trains for SECONDS of wall clock in the background (data
                 # preparation not counted), the step count fitted to the time (train.time_budget_s); later calls run meanwhile
    local name=$1 seconds=$2 config=$3; shift 3
    setsid bash -c "timeout -s TERM -k 60 $((seconds + 300)) $PY train/main.py --config $config --data-root $DATA \
        --out $WORK/runs/$name --resume --set tracking.offline=true --set tracking.run_name=$name \
        --set train.time_budget_s=$seconds --set train.time_budget_wall=true --set train.max_steps=10000000 $* ${TRAIN_LIMIT[*]} \
        > $WORK/results/train_$name.log 2>&1; echo \$? > $WORK/results/train_$name.rc" \
        < /dev/null > /dev/null 2>&1 &  # its own session: it outlives this call
    log "training $name in the background for $seconds s (log: results/train_$name.log)"
}
step_bgsweep() {  # SWEEP_FILE: its tasks trained one after another in the background, each for the file's time
                  # budget, then evaluated on LIVE1 gray (scripts/gpu/sweep.sh); `pack NAME nomodel` brings them back
    local name; name=$(basename "$1" .toml)
    local eval=(EVAL_DEVICE=$DEVICE)
    if [ "${GPU_DRY_RUN:-0}" = 1 ]; then  # two test images
        mkdir -p "$DATA/live1_dry" && cp -n $(ls "$DATA"/live1_gray/*.* | head -n 2) "$DATA/live1_dry/"
        eval+=(EVAL_DATASET=live1_dry LATENCY_SHAPES=64x64x1)
    fi
    setsid env PY=$PY "${eval[@]}" bash scripts/gpu/sweep.sh "$1" "$DATA" "$WORK" --set tracking.offline=true "${SWEEP_LIMIT[@]}" \
        > "$WORK/results/sweep_$name.log" 2>&1 < /dev/null &
    log "sweep $name in the background (log: results/sweep_$name.log; runs: runs/$name)"
}
step_progress() {  # the carried parts and the background training's last lines
    du -sh "$WORK"/parts/* "$DATA"/* 2>/dev/null
    tail -n 2 "$WORK"/results/train_*.log "$WORK"/results/sweep_*.log 2>/dev/null
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
}
step_waittrain() {  # until the background training has ended (its own timeout bounds it)
    while pgrep -f "train/main.py|scripts/gpu/sweep.sh" > /dev/null; do sleep 5; done
    tail -n 4 $(ls "$WORK"/results/train_*.log "$WORK"/results/sweep_*.log 2>/dev/null) /dev/null
}
step_eval() {  # LIVE1 (the test set) of a run's best checkpoint, gray or color by its mode
    local ckpt="$WORK/runs/$1/image_compression_model.pth" set=live1_gray
    $PY -c "import torch,sys; sys.exit(torch.load('$ckpt', weights_only=True)['mode'] != 'rgb')" && set=live1_color
    $PY -m train.evaluate --checkpoint "$ckpt" --data-root "$DATA" --dataset $set --device $DEVICE --precision auto \
        --json "$WORK/results/eval_$1_$set.json"
}
step_bound() {  # NAME: restore's quality bound, measured on the run's own held-out images on the GPU (seconds,
               # where the CPU here takes minutes) and recorded in its checkpoint; bounded, so the `pack` after it runs
    timeout -k 5 "${BOUND_LIMIT:-60}" $PY -m train.quality_bound "$WORK/runs/$1/image_compression_model.pth" --data-root "$DATA" \
        --device $DEVICE --write | tee "$WORK/results/bound_$1.txt"
}
step_latency() {  # [NAME|shipped] [SHAPES]: every runner (exports kept in deploy/ for the next latency step);
                 # torch.compile compiles per shape; results/latency_NAME_SHAPES.{json,md}
    local ckpt=image_compression_model.pth name=${1:-shipped} shapes=${2:-$SHAPES}
    [ "$name" != shipped ] && ckpt="$WORK/runs/$name/image_compression_model.pth"
    timeout -k 10 "${LATENCY_LIMIT:-300}" $PY export/to_trt.py --checkpoint "$ckpt" --out "$WORK/deploy" --data-root "$DATA" --no-mlflow --shapes "$shapes" \
        ${LATENCY_BACKENDS:+--backends $LATENCY_BACKENDS}
    local rc=$?
    for f in "$WORK"/deploy/latency.json "$WORK"/deploy/latency.md; do
        [ -f "$f" ] && mv "$f" "$WORK/results/latency_${name}_${shapes//,/_}.${f##*.}"
    done
    return $rc
}
step_restore12mp() {  # a 12-megapixel color JPEG (a LIVE1 photo resized to 4000x3000, q30) through restore on the
                     # GPU, gray (luma) and RGB models: time, peak host and GPU memory (restore reports them)
    local big=$WORK/big12mp
    mkdir -p "$big/in"
    $PY -c "from PIL import Image; import sys, glob; f = sorted(glob.glob(sys.argv[1] + '/*.*'))[0]; \
Image.open(f).convert('RGB').resize((4000, 3000), Image.BICUBIC).save(sys.argv[2], quality=30)" \
        "$DATA/live1_color" "$big/in/big.jpg" || return 1
    for model in gray rgb; do
        local args=(--device $DEVICE -o "$big/$model" --overwrite)
        [ $model = gray ] && args+=(--checkpoint image_compression_model.pth)  # the luma of the color photo
        /usr/bin/time -f "restore $model: %e s wall, peak RSS %M KiB" $PY -m serve_bench.restore "$big/in/big.jpg" "${args[@]}" \
            2>&1 | tail -n 4 | tee -a "$WORK/results/restore12mp.txt"
    done
}
step_pack() {  # NAME [nomodel]: a run (or a sweep's runs) without training states and prepared data, in 15 MiB
              # parts: cat NAME.tgz.* | tar xzf - (here); nomodel leaves the model files out too
    local skip=(--exclude checkpoints --exclude prepared)
    [ "${2:-}" = nomodel ] && skip+=(--exclude "*.pth")
    tar czf - -C "$WORK/runs" "${skip[@]}" "$1" | split -b 15M - "$OUT/$1.tgz."
    ls -l "$OUT/$1".tgz.*
}

status=0
for step in "$@"; do
    read -r -a words <<< "$step"
    log "${words[*]}"
    if declare -F "step_${words[0]}" > /dev/null; then
        "step_${words[0]}" "${words[@]:1}" || { status=1; log "FAILED: ${words[*]}"; }
    else
        log "unknown step ${words[0]}"; status=2
    fi
done
# a background training writes its log meanwhile: what was read so far comes back (tar would warn)
tar czf "$OUT/results.tgz" --warning=no-file-changed -C "$WORK" results
log "done (status $status)"
exit $status
