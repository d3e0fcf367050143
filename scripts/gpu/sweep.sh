#!/usr/bin/env bash
# The tasks of a sweep file one after another on one GPU (call.sh's `bgsweep` step starts it in the
# background): the training data prepared once, each task trained (its time budget comes from the
# sweep file), its best model evaluated on LIVE1 gray and timed at 512^2, the figures added to the
# run's record.
#   bash scripts/gpu/sweep.sh SWEEP_FILE DATA WORK [--set k=v ...]   (extra settings go to every task)
# Environment: PY (python3), EVAL_DEVICE (cuda), EVAL_DATASET (live1_gray), EVAL_QUALITIES (10,20,30,40),
# EVAL_PRECISION (fp32), LATENCY_SHAPES (512x512x1), LATENCY_ITERS (10), TASK_TIMEOUT (900 s), TASKS (the
# array indices to run, e.g. "2 5 6 7"; default all). On a CPU: EVAL_DEVICE=cpu.
set -uo pipefail
cd "$(dirname "$0")/../.."
sweep=$1 data=$2 work=$3; shift 3
PY=${PY:-python3}
name=$(basename "$sweep" .toml)
runs=$work/runs/$name
mkdir -p "$runs" "$work/results"
settings=$($PY -c "import sys, tomllib; b = tomllib.load(open(sys.argv[1], 'rb'))['base']; \
print(b['data.dataset'], b.get('data.mode', 'gray'), ','.join(map(str, b.get('data.qualities', [10, 20, 30, 40]))))" "$sweep") || exit 2
read -r dataset mode qualities <<< "$settings"
prepared=$work/prepared/$dataset-$mode
$PY -m data_pipeline.prepare "$dataset" --data-root "$data" --out "$prepared" --mode "$mode" --qualities "$qualities" \
    2>&1 | tail -n 1 || exit 2
n=$($PY -m train.sweep count --sweep "$sweep") || exit 2
for i in ${TASKS:-$(seq 0 $((n - 1)))}; do
    mapfile -t args < <($PY -m train.sweep args "$i" --sweep "$sweep" --sweep-id "$name")
    out=$runs/$i
    echo "== $(date +%T) task $i: ${args[*]:0:2}"
    # the budget bounds the training; the timeout only a task that hangs
    # (where MLflow is not installed the run is recorded to $out/mlflow_record.jsonl for train.import_run)
    timeout -s TERM -k 60 "${TASK_TIMEOUT:-900}" $PY train/main.py "${args[@]}" --data-root "$data" --out "$out" --resume \
        --set "data.prepared_dir=$prepared" "$@" > "$out.log" 2>&1
    echo "task $i exit $?: $(tail -n 1 "$out.log")"
    [ -f "$out/image_compression_model.pth" ] || continue
    $PY -m train.evaluate --checkpoint "$out/image_compression_model.pth" --data-root "$data" \
        --dataset "${EVAL_DATASET:-live1_gray}" --qualities "${EVAL_QUALITIES:-10,20,30,40}" --device "${EVAL_DEVICE:-cuda}" \
        --precision "${EVAL_PRECISION:-fp32}" --json "$work/results/${name}_$i.json" \
        --log-mlflow 2>&1 | tail -n 2
    # the latency of torch eager at 512^2 (fp32, bf16/fp16 NHWC), into the record too
    $PY -m serve_bench.benchmark --checkpoint "$out/image_compression_model.pth" --device "${EVAL_DEVICE:-cuda}" \
        --backends torch --shapes "${LATENCY_SHAPES:-512x512x1}" --iters "${LATENCY_ITERS:-10}" --out "$out/latency" 2>&1 | tail -n 1
done
echo "== $(date +%T) sweep $name done"
