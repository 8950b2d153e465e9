#!/usr/bin/env bash
# The one entry point of the image, and of the SLURM and Kubernetes examples; it runs the same way from a
# checkout (./docker/entrypoint.sh ...) with the project's venv active or its python on PATH.
#
#   entrypoint.sh preprocess SRC OUT [...]      python -m preprocess (sharding; --num-jobs/--job-index/--merge)
#   entrypoint.sh sample-videos OUT [...]       python -m preprocess.sample_videos (the synthetic sample)
#   entrypoint.sh train --config C [k=v ...]    torchrun [launch settings below] -m train --config C [k=v ...]
#   entrypoint.sh doctor [...]                  torchrun [launch settings below] -m train doctor [...]
#   entrypoint.sh evaluate PROTOCOL [...]       python -m evaluate PROTOCOL [...]
#   entrypoint.sh shell [ARGS]                  bash [ARGS]
#   entrypoint.sh help                          this text
#   entrypoint.sh ANY OTHER COMMAND             run as it is (e.g. tensorboard --logdir runs)
#
# Launch settings of train and doctor, from the environment:
#   NPROC_PER_NODE   processes on this node (default: $PET_NPROC_PER_NODE, else the visible GPUs, or 1 without one)
#   NNODES           nodes (default $PET_NNODES, else 1 = a standalone rendezvous on this node; MIN:MAX is elastic)
#   RDZV_ENDPOINT    host:port of the c10d rendezvous, needed when NNODES != 1 (default: $MASTER_ADDR:$MASTER_PORT,
#                    which a Kubeflow PyTorchJob sets, else $PET_MASTER_ADDR:$PET_MASTER_PORT, which a Kubeflow
#                    Trainer v2 TrainJob sets)
#   RDZV_ID          rendezvous id, the same on every node of one run (default: $SLURM_JOB_ID, else motionpretrain)
#   RDZV_BACKEND     c10d (default) or static; static also needs NODE_RANK (0 .. NNODES-1)
#   RDZV_CONF        extra rendezvous settings, e.g. join_timeout=900
#   MAX_RESTARTS     worker-group restarts after a failure (default 0)
#   SHUTDOWN_TIMEOUT seconds the workers get to checkpoint after SIGTERM/SIGUSR1 before SIGKILL (default 240)
#   TORCHRUN_ARGS    more torchrun flags, split on spaces
#   DOCTOR_FIRST=1   train runs `python -m train doctor` (one process, with the same --config and key=value
#                    overrides) first, and does not start when it fails
#   DOCTOR_ARGS      more flags for that preflight, split on spaces
#   PYTHON           the interpreter (default: $VIRTUAL_ENV/bin/python, else python, else python3 on PATH)
#   DRY_RUN=1        print the command instead of running it
#
# Signals: train and doctor exec torchrun, which forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1
# (SLURM's pre-emption warning) to every worker and gives them SHUTDOWN_TIMEOUT seconds: the trainer
# checkpoints and exits, and the run continues with --resume auto. Being exec'd, torchrun receives each
# signal once, whether it is sent to this process (docker stop, Kubernetes) or to every process of a
# SLURM step; the trainer must treat a second copy of the same signal as a no-op.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "entrypoint: $*" >&2; exit 2; }

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then echo "$VIRTUAL_ENV/bin/python"
  elif command -v python >/dev/null 2>&1; then echo python
  elif command -v python3 >/dev/null 2>&1; then echo python3
  else die "no python found: activate the project's venv, put python on PATH or set PYTHON"
  fi
}

# GPUs this process may use: CUDA_VISIBLE_DEVICES when it is set, else what nvidia-smi lists, else 0.
count_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    case "$CUDA_VISIBLE_DEVICES" in
      "" | -1 | none | NoDevFiles) echo 0 ;;
      *) local ids; IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"; echo "${#ids[@]}" ;;
    esac
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# torchrun's flags, from the environment (see the header), into the array LAUNCH.
launch_args() {
  # PET_*: what Kubeflow Trainer v2's torch runtime (TrainJob) sets for torchrun
  local nproc="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-}}" nnodes="${NNODES:-${PET_NNODES:-1}}"
  local backend="${RDZV_BACKEND:-c10d}"
  if [ "$nproc" = auto ]; then nproc=""; fi
  if [ -z "$nproc" ]; then
    nproc="$(count_gpus)"
    [ "$nproc" -gt 0 ] 2>/dev/null || nproc=1
  fi
  LAUNCH=(--nproc-per-node="$nproc" --nnodes="$nnodes" --max-restarts="${MAX_RESTARTS:-0}"
          "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
          --shutdown-timeout="${SHUTDOWN_TIMEOUT:-240}")
  if [ "$nnodes" = 1 ]; then
    LAUNCH+=(--standalone)
  else
    local endpoint="${RDZV_ENDPOINT:-}"
    if [ -z "$endpoint" ] && [ -n "${MASTER_ADDR:-}" ]; then endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"; fi
    if [ -z "$endpoint" ] && [ -n "${PET_MASTER_ADDR:-}" ]; then
      endpoint="$PET_MASTER_ADDR:${PET_MASTER_PORT:-29500}"
    fi
    [ -n "$endpoint" ] || die "NNODES=$nnodes needs RDZV_ENDPOINT=host:port (the first node), or MASTER_ADDR"
    if [ "$backend" = static ]; then
      [ -n "${NODE_RANK:-}" ] || die "RDZV_BACKEND=static needs NODE_RANK"
      LAUNCH+=(--node-rank="$NODE_RANK" --master-addr="${endpoint%:*}" --master-port="${endpoint##*:}")
    else
      LAUNCH+=(--rdzv-backend="$backend" --rdzv-endpoint="$endpoint"
               --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-motionpretrain}}")
      if [ -n "${RDZV_CONF:-}" ]; then LAUNCH+=(--rdzv-conf="$RDZV_CONF"); fi
    fi
  fi
  if [ -n "${TORCHRUN_ARGS:-}" ]; then
    local extra; read -r -a extra <<<"$TORCHRUN_ARGS"; LAUNCH+=("${extra[@]}")
  fi
}

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; return 0; fi
  "$@"
}

run_exec() {
  if [ "${DRY_RUN:-0}" = 1 ]; then run "$@"; exit 0; fi
  exec "$@"
}

# The preflight of DOCTOR_FIRST=1: the train arguments' --config and key=value overrides, one process.
doctor_first() {
  local args=() a take=0
  for a in "$@"; do
    if [ "$take" = 1 ]; then args+=("$a"); take=0; continue; fi
    case "$a" in
      --config) args+=("$a"); take=1 ;;
      --config=*) args+=("$a") ;;
      -*) ;;
      *=*) args+=("$a") ;;
    esac
  done
  local extra=()
  if [ -n "${DOCTOR_ARGS:-}" ]; then read -r -a extra <<<"$DOCTOR_ARGS"; fi
  echo "entrypoint: preflight: python -m train doctor ${args[*]} ${extra[*]}" >&2
  run "$PY" -m train doctor "${args[@]}" "${extra[@]}" ||
    { echo "entrypoint: the preflight failed (above): not starting training" >&2; exit 3; }
}

cmd="${1:-help}"
if [ "$#" -gt 0 ]; then shift; fi
case "$cmd" in
  help | -h | --help) usage; exit 0 ;;
  shell) run_exec bash "$@" ;;
esac

PY="$(pick_python)"
case "$cmd" in
  preprocess)    run_exec "$PY" -m preprocess "$@" ;;
  sample-videos) run_exec "$PY" -m preprocess.sample_videos "$@" ;;
  evaluate)      run_exec "$PY" -m evaluate "$@" ;;
  train)
    launch_args
    if [ "${DOCTOR_FIRST:-0}" = 1 ]; then doctor_first "$@"; fi
    run_exec "$PY" -m torch.distributed.run "${LAUNCH[@]}" -m train "$@" ;;
  doctor)
    launch_args
    run_exec "$PY" -m torch.distributed.run "${LAUNCH[@]}" -m train doctor "$@" ;;
  *) run_exec "$cmd" "$@" ;;
esac
