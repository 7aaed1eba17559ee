#!/usr/bin/env bash
# The observability test runs a real Prometheus (Debian package `prometheus`), and
# the multi-host tests build network namespaces with `ip` (Debian package `iproute2`).
# Install what is missing; never leave the packaged service running: the test
# starts its own server on a free loopback port and stops it.
set -euo pipefail
packages=()
if ! { command -v promtool >/dev/null && command -v prometheus >/dev/null; }; then
    packages+=(prometheus)
fi
if ! command -v ip >/dev/null; then
    packages+=(iproute2)
fi
if [ "${#packages[@]}" -eq 0 ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${packages[@]}"
# `service` stops it under systemd and sysvinit alike; fine if it never started.
$sudo service prometheus stop >/dev/null 2>&1 || true
