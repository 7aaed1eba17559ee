#!/usr/bin/env bash
# The observability test runs a real Prometheus (Debian package `prometheus`).
# Install it when missing; never leave the packaged service running: the test
# starts its own server on a free loopback port and stops it.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends prometheus
# `service` stops it under systemd and sysvinit alike; fine if it never started.
$sudo service prometheus stop >/dev/null 2>&1 || true
