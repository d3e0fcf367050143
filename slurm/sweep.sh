#!/bin/bash
# Train every architecture of a sweep file (configs/sweep.toml: configs x grid), one array task
# each, all logging to one MLflow experiment. Override any default on the sbatch command line:
#
#   sbatch slurm/sweep.sh                                               # CPU processes: CPU_PROCS (1)
#   sbatch --array=0-$(( $(python -m train.sweep count) - 1 )) --gres=gpu:4 --partition=<yours> slurm/sweep.sh
#   sbatch --cpus-per-task=1 slurm/sweep.sh --smoke                     # extra args go to train/main.py
#
# Environment: SWEEP_FILE (configs/sweep.toml), SWEEP_OUT (outputs/sweep), NPROC_PER_NODE (default:
# the GPUs allocated on the node, else CPU_PROCS=1), JPEG_RESTORE_DATA_ROOT, MLFLOW_TRACKING_URI (default: SQLite in
# mlruns/ of the submit directory), SWEEP_EVAL=0 to skip the LIVE1 evaluation after training,
# EVAL_DATASET (live1_gray), EVAL_QUALITIES (10,20,30,40). Near the time limit (or on preemption) Slurm sends SIGTERM;
# the task saves a checkpoint, requeues itself and resumes where it stopped.
#SBATCH --job-name=jpeg-sweep
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f train/main.py ] || { echo "error: submit from the repository root (sbatch slurm/sweep.sh): $PWD has no train/main.py" >&2; exit 1; }

SWEEP_FILE=${SWEEP_FILE:-configs/sweep.toml}
SWEEP_ID=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}
INDEX=${SLURM_ARRAY_TASK_ID:-0}
OUT=${SWEEP_OUT:-outputs/sweep}/$SWEEP_ID/task_$INDEX
GPUS=${SLURM_GPUS_ON_NODE:-0}  # GPUs allocated to this job on this node
NPROC=${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : ${CPU_PROCS:-1} ))}
# Threads per process: the task's CPUs shared among its processes (without this, tasks sharing a node
# each start one thread per core of the node and oversubscribe it).
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}

ARGS_TEXT=$(python -m train.sweep args "$INDEX" --sweep "$SWEEP_FILE" --sweep-id "$SWEEP_ID")
mapfile -t TASK_ARGS <<< "$ARGS_TEXT"
echo "sweep $SWEEP_ID task $INDEX (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $NPROC processes x $OMP_NUM_THREADS threads -> $OUT"

# train.launch is torchrun with a stop by a signal said in one line, not a traceback. --shutdown-timeout:
# after passing SIGTERM on, torchrun waits this long (not its 30 s) for the workers to save before it
# SIGKILLs them; Slurm's own kill comes 120 s after the signal
srun --kill-on-bad-exit=1 python -m train.launch --shutdown-timeout 100 --standalone --nproc_per_node "$NPROC" \
    train/main.py "${TASK_ARGS[@]}" --out "$OUT" --resume "$@" &
child=$!
requeue() {
    echo "sweep $SWEEP_ID task $INDEX: got SIGTERM, saving a checkpoint and requeueing"
    # SIGTERM to srun itself would make it SIGKILL the step; signal the step's processes instead
    scancel --signal=TERM "$SLURM_JOB_ID.0" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true
    wait "$child" || true
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap requeue TERM
wait "$child"
trap - TERM

# LIVE1 figures of the best checkpoint, logged to the task's MLflow run (train.compare reads them).
if [ "${SWEEP_EVAL:-1}" = 1 ]; then
    python -m train.evaluate --checkpoint "$OUT/image_compression_model.pth" --dataset "${EVAL_DATASET:-live1_gray}" \
        --qualities "${EVAL_QUALITIES:-10,20,30,40}" --json "$OUT/eval.json" --log-mlflow
fi
