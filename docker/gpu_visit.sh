#!/usr/bin/env bash
# shellcheck disable=SC2329  # machine, imports and collect run through `stage NAME FUNCTION`
# The GPU machine's side of a first-GPU visit: join the wheel parts carried over, install them with no index into
# a folder put in front of the machine's own Python (PYTHONPATH: its CUDA torch is used, never replaced, whether
# that Python is the system's, a venv or a conda env), run the acceptance run within a budget, and leave its JSON
# (and the per-step logs) in OUT, where the visit's results are collected. Every stage is timed (OUT/visit.jsonl).
#
#   docker/gpu_visit.sh [OUT] [DIR]          OUT: default $OUT (the device tool's folder) or ./visit-out;
#                                            DIR: the carried folder (default build/wheels, see carry_wheels.sh)
#   env: BUDGET      seconds for the acceptance run (default 420: it skips, and says so, what would not fit)
#        PYTHON      the machine's Python with CUDA torch (default python3)
#        SITE        the folder the wheels go into (default /tmp/motionpretrain-site: pip install --target, no
#                    dependency resolution, as the carried set is the whole closure of the venv but torch)
#        WORK        the acceptance run's data folder (default /tmp/motionpretrain-acceptance)
#        QUICK=1     pass --quick (the CPU-sized rows: what the rehearsal on a CPU machine runs)
#
# Here (a CPU machine) the same script is the rehearsal: PYTHON is a Python with torch, the GPU rows skip.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out="${1:-${OUT:-visit-out}}"
dir="${2:-build/wheels}"
BUDGET="${BUDGET:-420}"
PYTHON="${PYTHON:-python3}"
SITE="${SITE:-/tmp/motionpretrain-site}"
WORK="${WORK:-/tmp/motionpretrain-acceptance}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
t_visit=$(date +%s%N)

seconds_since() {   # seconds since a `date +%s%N` reading, to 0.1 s (no bc/awk needed)
  local ds=$(( ($(date +%s%N) - $1) / 100000000 ))
  echo "$((ds / 10)).$((ds % 10))"
}

stage() {   # stage NAME COMMAND...: run, time, log to OUT/NAME.log and OUT/visit.jsonl; returns the command's code
  # "seconds" is wall clock, "cpu_seconds" the user + system time of the stage's processes (bash's `time`): on a
  # busy machine (a rehearsal beside other work) the second is the figure that carries over to an idle one
  local name="$1"; shift
  local t0 rc u s ms
  t0=$(date +%s%N)
  echo "== $name: $*"
  { TIMEFORMAT='%3U %3S'; time "$@" > >(tee "$out/$name.log") 2>&1; } 2> "$out/.$name.time"
  rc=$?
  read -r u s < "$out/.$name.time" && rm -f "$out/.$name.time"
  ms=$(( 10#${u/./} + 10#${s/./} ))
  printf '{"stage": "%s", "rc": %d, "seconds": %s, "cpu_seconds": %d.%03d}\n' "$name" "$rc" "$(seconds_since "$t0")" \
    $((ms / 1000)) $((ms % 1000)) | tee -a "$out/visit.jsonl"
  return "$rc"
}

machine() {
  echo "host $(hostname), $(nproc) CPUs, python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total --format=csv; fi
  "$PYTHON" -c 'import torch; print("machine torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())'
  df -h /tmp | tail -1
}

imports() {
  PYTHONPATH="$SITE" "$PYTHON" -c 'import torch, nvidia.dali, kornia, av, webdataset, yaml
import preprocess, pipeline, model, train, evaluate
print("torch", torch.__version__, torch.__file__)
print("DALI", nvidia.dali.__version__, "torch.cuda", torch.cuda.is_available())'
}

collect() {   # the per-step logs of the acceptance run (their last 200 KB each)
  mkdir -p "$out/steps"
  for log in "$WORK"/steps/*.log; do
    [ -e "$log" ] && tail -c 200000 "$log" > "$out/steps/$(basename "$log")"
  done
  return 0
}

: > "$out/visit.jsonl"
rc=0
stage machine machine || true
if stage join docker/carry_wheels.sh join "$dir" \
   && stage install "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$dir"/wheels/*.whl \
   && stage imports imports; then
  quick=()
  [ "${QUICK:-0}" = 1 ] && quick=(--quick)
  # the acceptance run keeps to its --budget; the outer timeout (SIGTERM: it writes what it has) is a safety net
  stage acceptance env PYTHONPATH="$SITE" timeout -s TERM -k 30 "$((BUDGET + 120))" "$PYTHON" benchmarks/acceptance.py \
    --budget "$BUDGET" --work "$WORK" --json "$out/acceptance.json" "${quick[@]}"
  rc=$?
else
  rc=4
  echo "the set-up failed (see $out/visit.jsonl and the stage's log): no acceptance run" >&2
fi
stage collect collect || true
printf '{"stage": "visit", "rc": %d, "seconds": %s}\n' "$rc" "$(seconds_since "$t_visit")" | tee -a "$out/visit.jsonl"
echo "results: $out/acceptance.json (rewritten after every row), $out/visit.jsonl, $out/steps/*.log"
exit "$rc"
