#!/usr/bin/env bash
# Installs the Debian packages snapshotd builds, tests and benchmarks with.
# systemd brings systemd-analyze (SystemdTests), prometheus brings promtool
# (MetricsTests checks the /metrics output with `promtool check metrics`).
set -euo pipefail
sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update
$sudo_cmd apt-get install -y --no-install-recommends \
    libisal-dev libibverbs-dev librdmacm-dev pkg-config iperf3 iproute2 procps \
    python3 python3-venv python3-pip systemd prometheus
