#!/usr/bin/env bash
# One prepared device check (benchmarks/gpu_check.py): CUDA tests, training and restore
# throughput, network TFLOP/s, a 16-sample family; writes gpu_check.json and prints a
# table. Without a CUDA GPU it says so in one line and exits 0; --cpu measures the CPU
# rows at small sizes. Other options: benchmarks/gpu_check.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" CRYOWAE_NO_TENSORBOARD=1
exec "$PY" benchmarks/gpu_check.py "$@"
