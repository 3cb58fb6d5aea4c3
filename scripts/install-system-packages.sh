#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real when they are missing:
# slurm-wlm (slurmctld, slurmd, client tools: the tests start their own emulated cluster) and
# chromium (the dashboard's browser tests, driven by Playwright through /usr/bin/chromium) and
# libjemalloc2 (preloaded into `data prepare`'s tokenizer workers; without it they use glibc's
# allocator, slower by about 2x, and the test that checks the preload skips).
# Idempotent. Not root: installs through passwordless sudo when there is one; otherwise it says
# so and fails under CI=true (CI must run those tests), while on a developer's machine it only
# warns (those tests then skip, saying why).
set -euo pipefail

missing=()
if ! command -v slurmd >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1; then
    missing+=(slurm-wlm)
fi
if [ ! -x /usr/bin/chromium ]; then
    missing+=(chromium)
fi
if ! ls /usr/lib/*-linux-gnu/libjemalloc.so.2 >/dev/null 2>&1; then
    missing+=(libjemalloc2)
fi
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-packages: slurm-wlm ($(slurmd -V)), chromium and libjemalloc2 already installed"
    exit 0
fi
as_root=()
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "install-system-packages: not root and no passwordless sudo: ${missing[*]} NOT installed; their tests will skip" >&2
        if [ "${CI:-}" = "true" ]; then
            echo "install-system-packages: CI=true, so this is an error (run as root or give the runner sudo)" >&2
            exit 1
        fi
        exit 0
    fi
fi
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-system-packages: installed ${missing[*]}"
