#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment from a lock file:
#   bash scripts/venv.sh runtime   -> .venv with the agent's locked dependencies
#   bash scripts/venv.sh test      -> .venv with the locked test dependencies too
# Never installs into the system interpreter (PEP 668 systems refuse that).
# The environment is rebuilt only when the lock file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name="${1:-runtime}"
lock="requirements/${set_name}.lock"
[ -f "$lock" ] || { echo "venv.sh: no lock file $lock" >&2; exit 2; }
venv="${JOULEWARD_VENV:-.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # Debian and Ubuntu ship venv support as a separate package.
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  ver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "python${ver}-venv" >/dev/null
fi

stamp="$venv/.jouleward-lock"
stamp_for() { echo "$1 $(sha256sum "requirements/$1.lock" pyproject.toml | sha256sum | cut -d' ' -f1)"; }
want="$(stamp_for "$set_name")"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ]; then
  have="$(cat "$stamp")"
  # The test set is a superset of the runtime set.
  if [ "$have" = "$want" ] || { [ "$set_name" = runtime ] && [ "$have" = "$(stamp_for test)" ]; }; then
    exit 0
  fi
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$lock"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
