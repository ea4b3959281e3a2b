#!/usr/bin/env bash
# Regenerates the pod-resources API stubs from the vendored proto with grpcio-tools:
#   bash scripts/podresources-stubs.sh [output-root]   # default: the repository
# The test venv has grpcio-tools (bash scripts/venv.sh test).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  agent/workloads/podresources_v1/api.proto
