#!/usr/bin/env bash
# tmux: the `jouleward top` tests drive the live view in a real terminal.
set -euo pipefail
command -v tmux >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends tmux >/dev/null
