#!/usr/bin/env bash
# Creates or refreshes spark/.venv, the virtual environment of the Spark jobs.
# Reinstalls only when spark/pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/../spark"

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi

stamp=.venv/.sortline-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
  echo "$wanted" > "$stamp"
fi
