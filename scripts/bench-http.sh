#!/usr/bin/env bash
# The main job over HTTP: `hicache bench multiturn --base-url` against two `hicache serve` processes started here
# with the in-process bench's model and cache settings (device pool 1024 tokens, page 32, 4 running, host ratio 3, file
# storage in a temp directory, wait_complete): the device-only radix cache, then HiCache L1+L2+L3.
# Usage: scripts/bench-http.sh [extra bench multiturn flags]   (TP=2 via HICACHE_TP=2). The servers start cold once:
# run the script again for another cold figure (--repeat replays to the same, by then warm, servers).
set -euo pipefail
tp="${HICACHE_TP:-1}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
# the in-process bench's random model (hicache_core/bench/multiturn_args.py BENCH_SHAPE), not serve's smaller default
model=(--hidden-size 512 --intermediate-size 1536 --num-layers 4 --num-heads 8 --num-kv-heads 2 --head-dim 64
  --vocab-size 4096)
common=(--page-size 32 --max-total-tokens 1024 --max-running-requests 4 --tp-size "$tp" --host 127.0.0.1 "${model[@]}")
hicache serve "${common[@]}" --port 30101 >"$work/radix.log" 2>&1 &
hicache serve "${common[@]}" --port 30102 --enable-hierarchical-cache --hicache-ratio 3 \
  --hicache-storage-backend file --hicache-storage-prefetch-policy wait_complete \
  --hicache-storage-backend-extra-config "{\"storage_dir\": \"$work/store\", \"prefetch_threshold\": 64}" \
  >"$work/l3.log" 2>&1 &
for port in 30101 30102; do
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "server on $port did not start:"; cat "$work"/*.log; exit 1; }
done
hicache bench multiturn --base-url radix=http://127.0.0.1:30101 --base-url l3=http://127.0.0.1:30102 \
  --report-dir "${REPORT_DIR:-hicache-report/http}" "$@"
