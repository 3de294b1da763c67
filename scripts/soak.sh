#!/usr/bin/env bash
# Runs the demo agent at a frame rate above what the CPU can decide (so the queue stays full and
# drops), for SECONDS seconds, and samples its resident memory every INTERVAL seconds.
# Usage: bash scripts/soak.sh [SECONDS=1200] [FPS=30] [INTERVAL=30]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:-1200}"
fps="${2:-30}"
interval="${3:-30}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

node "$root/bin/sortline.js" demo --seconds "$seconds" --fps "$fps" --data-dir "$work/data" > "$work/demo.log" 2>&1 &
pid=$!
start=$(date +%s)
echo "elapsed_s,rss_mib"
while kill -0 "$pid" 2>/dev/null; do
  rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  [ -n "$rss_kib" ] && echo "$(( $(date +%s) - start )),$(( rss_kib / 1024 ))"
  sleep "$interval"
done
wait "$pid"
tail -n 1 "$work/demo.log"
