"""Fit the cost model's few global constants once against published training runs.

    python -m supercluster.plan.calibrate [--csv PATH] [--check]

Reads ../shared/calibration/published-runs.csv (see NOTES.md beside it), turns each row
into a plan request with the row's stated knobs fixed and its unstated ones searched, and
picks the constants that minimise the mean absolute percentage error of the figure each row
reports: hardware TFLOP/s for rows counted with recomputation (Narayanan's eq. 3), model
TFLOP/s or MFU otherwise, step time where that is all a row gives. One set of constants for
all rows, never one per row; the result goes to plan/constants.json, which the planner reads.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import write_atomic
from supercluster.hardware.catalog import accelerator, node_type
from supercluster.model.config import ModelConfig
from supercluster.plan.cost import CONSTANTS_FILE, Software, System, Workload
from supercluster.plan.search import Request, search

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CSV = REPO.parent / "shared" / "calibration" / "published-runs.csv"

# GPT-2/3 architecture as trained in these papers: LayerNorm, GELU MLP of 4h, learned
# positions, tied embeddings (Narayanan et al. 2021 use the GPT-2 design).
_GPT = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True)

# Rows' hardware: Selene is DGX A100 80GB; the Megatron README's H100 runs are DGX H100 (Eos).
_HARDWARE = {"a100-sxm4-80gb": ("a100-80gb", "dgx-a100"), "h100": ("h100", "dgx-h100")}


@dataclass
class Row:
    label: str
    request: Request
    metric: str  # hardware_tflops_per_gpu | model_tflops_per_gpu | mfu | step_time_s
    published: float
    fixed: dict = field(default_factory=dict)


def _int(text: str):
    return int(text) if text and text.strip() else None


def _software(source: str, notes: str) -> Software:
    if source.startswith("Megatron-LM README"):
        # Megatron-Core 2024: TE flash attention, --overlap-grad-reduce --overlap-param-gather
        # --tp-comm-overlap (stated in the row), fp32 gradient reduction.
        # Its distributed optimizer is ZeRO-1.
        return Software(flash_attention=True, overlap_dp=True, overlap_tp=True, grad_reduce_bytes=4, shardings=("none", "optimizer"))
    if "ZeRO-3 (DeepSpeed)" in notes:
        # DeepSpeed ZeRO-3 in 2021: 16-bit gathers and reductions at one NIC's rate per GPU.
        return Software(
            flash_attention=False, overlap_dp=False, overlap_tp=False, grad_reduce_bytes=2, hierarchical_dp=False,
            shardings=("full",),
        )
    # Megatron-LM 2021-22: unfused-by-flash attention, gradient all-reduce after the backward
    # pass ("no overlap", Korthikanti sec. 6.3), 16-bit gradients.
    return Software(flash_attention=False, overlap_dp=False, overlap_tp=False, grad_reduce_bytes=2, shardings=("none",))


def _fixed(r: dict) -> dict:
    source, notes, recompute = r["source"], r["notes"], r["recompute"].lower()
    fixed = {k: _int(r[k]) for k in ("tp", "pp", "dp", "cp", "microbatch") if _int(r[k])}
    if recompute.startswith("full"):
        fixed["recompute"] = "full"
    elif "selective" in recompute or "microbatch-level" in recompute:
        fixed["recompute"] = "selective"
    if source.startswith(("Narayanan", "Korthikanti")):
        # No distributed optimizer in Megatron-LM then; sequence parallelism is Korthikanti's.
        fixed["sequence_parallel"] = "sequence parallel" in recompute
        fixed["sharding"] = "none"
    if "ZeRO-3" in notes:
        fixed.update(sharding="full", tp=1, pp=1)
    if source.startswith("Korthikanti"):
        fixed["virtual_stages"] = 3 if "interleaved schedule with 3" in notes else 1
    return fixed


def _metric(r: dict) -> tuple[str, float] | None:
    notes = r["notes"]
    if r["achieved_tflops_per_gpu"]:
        hfu_like = "HFU-like" in notes or "hardware FLOPs" in notes or r["source"].startswith("Narayanan")
        return ("hardware_tflops_per_gpu" if hfu_like else "model_tflops_per_gpu"), float(r["achieved_tflops_per_gpu"])
    if r["mfu_percent"]:
        return "mfu", float(r["mfu_percent"]) / 100
    if r["step_time_s"]:
        return "step_time_s", float(r["step_time_s"])
    return None


def load_rows(path: Path = DEFAULT_CSV) -> tuple[list[Row], list[str]]:
    """The rows a prediction can be made for, and why each other row was skipped."""
    if not path.exists():
        raise UserError(f"Calibration data {path} not found; pass --csv with the path to published-runs.csv.")
    rows, skipped = [], []
    for r in csv.DictReader(path.open()):
        label = f"{r['model']} on {r['gpu_count'] or '?'} GPUs ({r['source'].split(' (')[0]})"
        batch = re.fullmatch(r"(\d+) seqs", r["global_batch_tokens_or_seqs"].strip())
        metric = _metric(r)
        if not (r["layers"] and r["gpu_count"] and batch and metric):
            skipped.append(f"{label}: no layer count, GPU count, batch or achieved figure in the row")
            continue
        key = next((k for k in _HARDWARE if r["gpu_type"].lower().startswith(k)), None)
        acc, node = _HARDWARE[key]
        vocab = re.search(r"vocab (?:V=)?(\d+)", r["notes"])
        seq = int(r["seq_len"])
        model = ModelConfig(
            layers=int(r["layers"]), hidden=int(r["hidden"]), heads=int(r["heads"]),
            vocab_size=int(vocab.group(1)) if vocab else 51200, max_seq_len=seq, **_GPT,
        )
        fixed = _fixed(r)
        request = Request(
            Workload(model, seq, int(batch.group(1))),
            System(accelerator(acc), node_type(node), "bf16"),
            int(r["gpu_count"]),
            _software(r["source"], r["notes"]),
            fixed,
        )
        rows.append(Row(label, request, metric[0], metric[1], fixed))
    return rows, skipped


def predict(row: Row, constants: dict) -> float:
    best = search(row.request, top=1, constants=constants)[0]
    return getattr(best, row.metric)


def mape(rows: list[Row], constants: dict) -> tuple[float, list[float]]:
    """Mean absolute percentage error, and each row's signed relative error."""
    errors = [(predict(row, constants) - row.published) / row.published for row in rows]
    return sum(map(abs, errors)) / len(errors), errors


def fit(rows: list[Row]) -> dict:
    """Golden-section search of the one GEMM efficiency on [0.3, 1.0]."""
    lo, hi = 0.3, 1.0
    ratio = (5**0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = mape(rows, {"gemm_efficiency": a})[0], mape(rows, {"gemm_efficiency": b})[0]
    while hi - lo > 1e-3:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = mape(rows, {"gemm_efficiency": a})[0]
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = mape(rows, {"gemm_efficiency": b})[0]
    return {"gemm_efficiency": round((lo + hi) / 2, 4)}


def report(rows: list[Row], constants: dict) -> float:
    total, errors = mape(rows, constants)
    for row, err in zip(rows, errors):
        predicted = row.published * (1 + err)
        print(f"{row.label[:72]:72s} {row.metric:24s} published {row.published:9.3f} predicted {predicted:9.3f} ({err:+.1%})")
    print(f"MAPE over {len(rows)} rows: {total:.1%} with {constants}")
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--check", action="store_true", help="report the error of the checked-in constants, write nothing")
    args = parser.parse_args(argv)
    rows, skipped = load_rows(args.csv)
    for reason in skipped:
        print(f"skipped {reason}")
    if args.check:
        report(rows, json.loads(CONSTANTS_FILE.read_text())["constants"])
        return
    constants = fit(rows)
    total = report(rows, constants)
    out = {
        "constants": constants,
        "fitted_by": "python -m supercluster.plan.calibrate",
        "data": "../shared/calibration/published-runs.csv",
        "rows": len(rows),
        "mape": round(total, 4),
    }
    write_atomic(CONSTANTS_FILE, json.dumps(out, indent=1) + "\n")
    print(f"wrote {CONSTANTS_FILE}")


if __name__ == "__main__":
    main()
