#!/usr/bin/env bash
# The GPU checks, as one script for the lent device machine (no network there: run from the source tree).
#   device run: bash scripts/gpu-check.sh
# Runs the transfer tests with the Triton kernel on CUDA, then `hicache bench transfer` (kernel and direct,
# each beside a pinned-host<->GPU contiguous copy of the same bytes). Results land in $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/hicache-gpu}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_transfer.py tests/test_memory.py 2>&1 | tee "$out/tests.txt"
timeout 240 python3 -m hicache_core.cli bench transfer --pages 512 --repeat 10 --json > "$out/bench_transfer.json" 2> "$out/bench_stderr.txt"
python3 -m hicache_core.cli bench transfer --pages 512 --repeat 10 2>&1 | tee "$out/bench_transfer.txt"
