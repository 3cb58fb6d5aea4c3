"""NVIDIA device faults read through `nvidia-smi` and the kernel log.

Untested on this project's CPU machines beyond the parsers (fed with nvidia-smi's documented
output formats): on a node without nvidia-smi every check here is skipped with the reason.
Each check counts faults; any nonzero count fails the node.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from supercluster.health.results import Measurement

# XIDs that mean broken hardware rather than a crashed application: Azure's node health
# checks (azurehpc-health-checks, check_gpu_xid) drain a node on these.
FATAL_XIDS = frozenset({48, 56, 57, 58, 62, 63, 64, 65, 68, 69, 73, 74, 79, 80, 81, 92, 119, 120})

# clocks_event_reasons bits that mean the GPU is slowed by a fault, not by policy or idleness
# (nvml.h: HW slowdown 0x8, SW thermal 0x20, HW thermal 0x40, HW power brake 0x80).
BAD_CLOCK_EVENTS = {0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}

_XID_LINE = re.compile(r"NVRM: Xid \((?P<device>[^)]*)\): (?P<code>\d+)")


def _smi(*args: str) -> str:
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def _unavailable(check: str, unit: str, nvidia_node: bool) -> Measurement | None:
    """A skip when nvidia-smi cannot be used here; None when the check can run."""
    if not nvidia_node:
        return Measurement.skipped(check, unit, "not an NVIDIA node", applies=False)
    if shutil.which("nvidia-smi") is None:
        return Measurement.skipped(check, unit, "nvidia-smi is not installed on this NVIDIA node")
    return None


def parse_ecc(csv: str) -> dict[int, int]:
    """`--query-gpu=index,ecc.errors.uncorrected.volatile.total --format=csv,noheader,nounits`."""
    counts = {}
    for line in csv.strip().splitlines():
        index, value = (field.strip() for field in line.split(","))
        counts[int(index)] = int(value) if value.isdigit() else 0  # "[N/A]" where ECC is off
    return counts


def parse_xids(kernel_log: str) -> list[dict]:
    return [
        {"device": m["device"], "xid": int(m["code"]), "fatal": int(m["code"]) in FATAL_XIDS}
        for m in _XID_LINE.finditer(kernel_log)
    ]


def parse_nvlink_status(text: str) -> dict[int, int]:
    """Inactive links per GPU from `nvidia-smi nvlink --status`."""
    inactive, gpu = {}, None
    for line in text.splitlines():
        if match := re.match(r"GPU (\d+):", line):
            gpu = int(match[1])
            inactive[gpu] = 0
        elif gpu is not None and re.match(r"\s*Link \d+:", line) and "inactive" in line.lower():
            inactive[gpu] += 1
    return inactive


def parse_clock_events(csv: str) -> dict[int, list[str]]:
    """Fault reasons per GPU from `--query-gpu=index,clocks_event_reasons.active --format=csv,noheader`."""
    reasons = {}
    for line in csv.strip().splitlines():
        index, mask = (field.strip() for field in line.split(","))
        bits = int(mask, 16) if mask.lower().startswith("0x") else 0
        reasons[int(index)] = [name for bit, name in BAD_CLOCK_EVENTS.items() if bits & bit]
    return reasons


def ecc_errors(nvidia_node: bool) -> Measurement:
    if skip := _unavailable("ecc_errors", "errors", nvidia_node):
        return skip
    counts = parse_ecc(_smi("--query-gpu=index,ecc.errors.uncorrected.volatile.total", "--format=csv,noheader,nounits"))
    return Measurement("ecc_errors", float(sum(counts.values())), "errors", {"uncorrected_per_gpu": counts})


def xid_errors(nvidia_node: bool) -> Measurement:
    if not nvidia_node:
        return Measurement.skipped("xid_errors", "events", "not an NVIDIA node", applies=False)
    try:
        log = subprocess.run(["dmesg", "--kernel"], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        return Measurement.skipped("xid_errors", "events", f"kernel log unreadable: {err}")
    events = parse_xids(log)
    fatal = [e for e in events if e["fatal"]]
    return Measurement("xid_errors", float(len(fatal)), "events", {"fatal": fatal, "all_codes": sorted({e["xid"] for e in events})})


def nvlink_inactive(nvidia_node: bool) -> Measurement:
    """Links reported <inactive>; PCIe-only GPUs list no links and count zero."""
    if skip := _unavailable("nvlink_inactive", "links", nvidia_node):
        return skip
    inactive = parse_nvlink_status(_smi("nvlink", "--status"))
    return Measurement("nvlink_inactive", float(sum(inactive.values())), "links", {"inactive_per_gpu": inactive})


def clock_throttle(nvidia_node: bool) -> Measurement:
    if skip := _unavailable("clock_throttle", "GPUs", nvidia_node):
        return skip
    try:
        csv = _smi("--query-gpu=index,clocks_event_reasons.active", "--format=csv,noheader")
    except subprocess.CalledProcessError:  # drivers before 535 know only the older name
        csv = _smi("--query-gpu=index,clocks_throttle_reasons.active", "--format=csv,noheader")
    reasons = {gpu: names for gpu, names in parse_clock_events(csv).items() if names}
    return Measurement("clock_throttle", float(len(reasons)), "GPUs", {"throttled": reasons})
