#!/usr/bin/env bash
# Runs every test: TypeScript (vitest) and Python (pytest on a local Spark session).
# Expects `npm ci` to have run; creates the Python environment when it is missing or stale.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

npm run build --silent
bash scripts/python-env.sh

status=0
npx vitest run || status=$?
# The fault-injection suite at a tenth of its durations and iteration counts fits CI time;
# `npm run test:faults` runs it in full and regenerates docs/faults.md.
SORTLINE_FAULT_SCALE="${SORTLINE_FAULT_SCALE:-0.1}" npx vitest run --config vitest.faults.config.ts || status=$?
(cd spark && .venv/bin/python -m pytest -q tests) || status=$?
exit "$status"
