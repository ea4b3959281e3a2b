#!/usr/bin/env bash
# The training frameworks the callback tests drive for real (tests/test_integrations.py):
# requirements/frameworks.txt into the test venv, with pip (they are not in the uv locks).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${JOULEWARD_VENV:-.venv}"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements/frameworks.txt
