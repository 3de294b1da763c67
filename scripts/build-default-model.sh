#!/usr/bin/env bash
# Rebuilds models/default: the INT8 TrashNet model package and its evaluation report.
# Datasets are read from SORTLINE_DATASETS (default: the shared/datasets folder beside this checkout).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
datasets="${SORTLINE_DATASETS:-$root/../shared/datasets}"
if [ ! -d "$datasets/trashnet" ]; then
  echo "build-default-model: $datasets/trashnet not found; set SORTLINE_DATASETS to the folder that contains trashnet/" >&2
  exit 1
fi
bash "$root/scripts/python-env.sh"
exec "$root/spark/.venv/bin/python" -m sortline_spark.train \
  --data "$datasets/trashnet" \
  --out "$root/models/default" \
  --name sortline-trashnet \
  --version "${SORTLINE_MODEL_VERSION:-1.0.0}" \
  "$@"
