#!/usr/bin/env bash
# Installs Debian's slurm-wlm (slurmctld, slurmd, client tools) when it is missing.
# Idempotent: does nothing when slurmd is already on PATH; skips quietly when not root,
# because the Slurm tests then skip with a reason of their own.
set -euo pipefail

if command -v slurmd >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1; then
    echo "install-slurm: slurm-wlm already installed ($(slurmd -V))"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install-slurm: not root, skipping (Slurm tests will be skipped)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
echo "install-slurm: installed $(slurmd -V)"
