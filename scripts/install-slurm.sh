#!/usr/bin/env bash
# Installs Debian's slurm-wlm (slurmctld, slurmd, client tools) when it is missing.
# Idempotent: does nothing when slurmd is already on PATH. Not root: installs through
# passwordless sudo when there is one; otherwise it says so and fails under CI=true (CI must run
# the Slurm tests), while on a developer's machine it only warns (those tests then skip, saying why).
set -euo pipefail

if command -v slurmd >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1; then
    echo "install-slurm: slurm-wlm already installed ($(slurmd -V))"
    exit 0
fi
as_root=()
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "install-slurm: not root and no passwordless sudo: slurm-wlm NOT installed; the Slurm tests will skip" >&2
        if [ "${CI:-}" = "true" ]; then
            echo "install-slurm: CI=true, so this is an error (run as root or give the runner sudo)" >&2
            exit 1
        fi
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
echo "install-slurm: installed $(slurmd -V)"
