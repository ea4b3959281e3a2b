#!/usr/bin/env bash
# A C compiler and libc headers, so the GPU tests can build the fake NVML library.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v gcc >/dev/null 2>&1 || ! dpkg -s libc6-dev >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
fi
