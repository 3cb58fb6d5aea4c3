"""NVIDIA device faults read through `nvidia-smi` and the kernel log.

Untested on real GPUs on this project's CPU machines: the tests feed the parsers nvidia-smi's
documented output formats and run a stand-in `nvidia-smi` script. On a node without
nvidia-smi, or where it fails, hangs or prints something unexpected, the check is skipped with
the reason (the run is then incomplete, never passed). Each check counts faults; any nonzero
count fails the node.
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


SMI_TIMEOUT_S = 60.0


class Unreadable(Exception):
    """nvidia-smi could not tell us: it is missing, failed, hung or printed something we cannot parse."""


def _smi(*args: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Unreadable(f"nvidia-smi {args[0]} did not answer within {SMI_TIMEOUT_S:.0f} s") from None
    except OSError as err:
        raise Unreadable(f"nvidia-smi could not start ({err.strerror or err})") from None
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unreadable(f"nvidia-smi {args[0]} exited {out.returncode}: {tail[0]}")
    return out.stdout


def _unavailable(check: str, unit: str, nvidia_node: bool) -> Measurement | None:
    """A skip when nvidia-smi cannot be used here; None when the check can run."""
    if not nvidia_node:
        return Measurement.skipped(check, unit, "not an NVIDIA node", applies=False)
    if shutil.which("nvidia-smi") is None:
        return Measurement.skipped(check, unit, "nvidia-smi is not installed on this NVIDIA node")
    return None


def _csv_rows(csv: str) -> list[tuple[int, str]]:
    """`index, value` lines as (index, value); anything else is garbage, not an empty answer."""
    rows = []
    for line in csv.strip().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 2 or not fields[0].isdigit():
            raise Unreadable(f"unexpected nvidia-smi line {line.strip()[:80]!r}")
        rows.append((int(fields[0]), fields[1]))
    if not rows:
        raise Unreadable("nvidia-smi listed no GPUs")
    return rows


def parse_ecc(csv: str) -> dict[int, int | None]:
    """`--query-gpu=index,ecc.errors.uncorrected.volatile.total --format=csv,noheader,nounits`.

    None for a GPU whose count is unknown ("[N/A]" where ECC is off or unsupported).
    """
    return {index: int(value) if value.isdigit() else None for index, value in _csv_rows(csv)}


def parse_xids(kernel_log: str) -> list[dict]:
    return [
        {"device": m["device"], "xid": int(m["code"]), "fatal": int(m["code"]) in FATAL_XIDS}
        for m in _XID_LINE.finditer(kernel_log)
    ]


def parse_nvlink_status(text: str) -> dict[int, int]:
    """Inactive links per GPU from `nvidia-smi nvlink --status` (every GPU is listed, with or without links)."""
    inactive, gpu = {}, None
    for line in text.splitlines():
        if match := re.match(r"GPU (\d+):", line):
            gpu = int(match[1])
            inactive[gpu] = 0
        elif gpu is not None and re.match(r"\s*Link \d+:", line) and "inactive" in line.lower():
            inactive[gpu] += 1
    if not inactive:
        raise Unreadable("nvidia-smi nvlink --status listed no GPUs")
    return inactive


def parse_clock_events(csv: str) -> dict[int, list[str] | None]:
    """Fault reasons per GPU from `--query-gpu=index,clocks_event_reasons.active --format=csv,noheader`.

    None for a GPU whose mask is not a hex number ("[N/A]", "[Unknown Error]").
    """
    reasons = {}
    for index, mask in _csv_rows(csv):
        try:
            bits = int(mask, 16) if mask.lower().startswith("0x") else None
        except ValueError:
            bits = None
        reasons[index] = None if bits is None else [name for bit, name in BAD_CLOCK_EVENTS.items() if bits & bit]
    return reasons


def _fault_count(check: str, unit: str, faults: dict[int, float | None], detail: dict) -> Measurement:
    """The node's fault count, or a skip when some GPU could not be read and none read faulty.

    A GPU we could not read is unknown, not healthy, so it never counts as zero. Nor does it
    count as a fault: the measurement is skipped with the reason, which makes the run
    `incomplete` (exit code 3, not drained, kept out of clusters that require health). Failing
    it instead would drain every node whose driver reports [N/A] for ECC (ECC switched off,
    consumer GPUs) as broken hardware, and the drain would hide the real cause, a
    configuration to fix. A fault read on another GPU of the node still fails it.
    """
    unknown = sorted(gpu for gpu, n in faults.items() if n is None)
    known = sum(n for n in faults.values() if n is not None)
    if unknown and known == 0:
        gpus = ", ".join(str(g) for g in unknown)
        return Measurement(check, None, unit, detail, skip_reason=f"nvidia-smi reports no value for GPU {gpus}")
    return Measurement(check, float(known), unit, {**detail, "unknown_gpus": unknown})


def _read(check: str, unit: str, nvidia_node: bool, parse, *queries: tuple[str, ...]):
    """(parse(output of the first query nvidia-smi answers), None), or (None, a skip with the reason).

    Later queries are fallbacks for drivers that do not know the first one's fields.
    """
    if skip := _unavailable(check, unit, nvidia_node):
        return None, skip
    try:
        for args in queries[:-1]:
            try:
                return parse(_smi(*args)), None
            except Unreadable:
                continue
        return parse(_smi(*queries[-1])), None
    except Unreadable as err:
        return None, Measurement.skipped(check, unit, str(err))


def ecc_errors(nvidia_node: bool) -> Measurement:
    counts, skip = _read("ecc_errors", "errors", nvidia_node, parse_ecc,
                         ("--query-gpu=index,ecc.errors.uncorrected.volatile.total", "--format=csv,noheader,nounits"))
    if skip:
        return skip
    return _fault_count("ecc_errors", "errors", counts, {"uncorrected_per_gpu": counts})


def xid_errors(nvidia_node: bool) -> Measurement:
    if not nvidia_node:
        return Measurement.skipped("xid_errors", "events", "not an NVIDIA node", applies=False)
    try:
        log = subprocess.run(["dmesg", "--kernel"], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return Measurement.skipped("xid_errors", "events", f"kernel log unreadable: {err}")
    events = parse_xids(log)
    fatal = [e for e in events if e["fatal"]]
    return Measurement("xid_errors", float(len(fatal)), "events", {"fatal": fatal, "all_codes": sorted({e["xid"] for e in events})})


def nvlink_inactive(nvidia_node: bool) -> Measurement:
    """Links reported <inactive>; PCIe-only GPUs list no links and count zero."""
    inactive, skip = _read("nvlink_inactive", "links", nvidia_node, parse_nvlink_status, ("nvlink", "--status"))
    if skip:
        return skip
    return Measurement("nvlink_inactive", float(sum(inactive.values())), "links", {"inactive_per_gpu": inactive})


def clock_throttle(nvidia_node: bool) -> Measurement:
    # drivers before 535 know only the older name of the field
    events, skip = _read("clock_throttle", "GPUs", nvidia_node, parse_clock_events,
                         ("--query-gpu=index,clocks_event_reasons.active", "--format=csv,noheader"),
                         ("--query-gpu=index,clocks_throttle_reasons.active", "--format=csv,noheader"))
    if skip:
        return skip
    throttled = {gpu: names for gpu, names in events.items() if names}
    faults = {gpu: None if names is None else float(bool(names)) for gpu, names in events.items()}
    return _fault_count("clock_throttle", "GPUs", faults, {"throttled": throttled})
