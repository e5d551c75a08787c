#!/bin/bash
# The GPU check a lent GPU host can run without TensorRT: runtime/cuda_mem.py (device buffers,
# streams, the copies of the TensorRT backends) through tests/runtime/test_cuda_mem.py.
# Needs the wheels of `pip download cuda-bindings==13.4.4 cuda-pathfinder pytest pluggy iniconfig`
# in build/gpu-wheels (the host has no package index). Imports only kiln/errors.py and
# runtime/cuda_mem.py, laid out as installed, so the host needs numpy and a CUDA driver only.
set -u
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
py=$(command -v python3); $py --version
tag=$($py -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
lib=$(mktemp -d); shim=$(mktemp -d)
$py -m pip install -q --no-deps --no-index --no-warn-script-location -t "$lib" build/gpu-wheels/cuda_pathfinder-*.whl \
  build/gpu-wheels/cuda_bindings-*-"$tag"-*.whl build/gpu-wheels/pytest-*.whl \
  build/gpu-wheels/pluggy-*.whl build/gpu-wheels/iniconfig-*.whl || exit 2
mkdir -p "$shim/kiln/runtime"
cp kiln/__init__.py kiln/errors.py "$shim/kiln/"
: > "$shim/kiln/runtime/__init__.py"
cp runtime/cuda_mem.py "$shim/kiln/runtime/"
PYTHONPATH="$lib:$shim" $py -P -m pytest -q -rA --noconftest -p no:cacheprovider \
  -o pythonpath= tests/runtime/test_cuda_mem.py
