#!/usr/bin/env bash
# Refreshes the lock files from pyproject.toml (run after changing a dependency):
#   bash scripts/lock.sh            # keeps current pins where the ranges allow
#   bash scripts/lock.sh --upgrade  # moves every pin to the newest allowed release
# uv resolves in about a second and writes hashes for every wheel; it runs from a
# throwaway environment, so nothing is installed into the system interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
tool="$(mktemp -d)"
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool"
"$tool/bin/python" -m pip install -q --disable-pip-version-check uv
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -c requirements/constraints.txt "$@")
"$tool/bin/uv" pip compile pyproject.toml requirements/build.in "${common[@]}" -o requirements/runtime.lock
"$tool/bin/uv" pip compile pyproject.toml requirements/build.in --extra test "${common[@]}" -o requirements/test.lock
