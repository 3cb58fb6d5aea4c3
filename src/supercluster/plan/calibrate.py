"""Fit each software profile's constants against published runs, and say how well the model
predicts runs it never saw.

    python -m supercluster.plan.calibrate [--csv PATH] [--check]

The data is the project's own `calibration/published-runs.csv` (package data; see its
README.md): one row per published figure, every layout property an explicit column. A blank
layout cell is a knob the source did not state: the prediction takes the fastest value that
fits in memory, as the team would have. Each row's stack names a profile (`plan.profiles`),
applied unchanged to every row of that stack.

The error reported is leave-one-source-out: for each source, the constants are fitted on the
other sources only and the left-out source is predicted. A profile with no rows left (its
only source is the one left out) takes the constants fitted on all remaining rows pooled.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import write_atomic
from supercluster.hardware.catalog import accelerator, node_type
from supercluster.model.config import ModelConfig
from supercluster.parallel.layout import Layout
from supercluster.plan.cost import CONSTANTS_FILE, INTERVAL_COVERAGE, MEMORY_MARGIN, RESERVED_GIB, interval_class, Estimate, System, Workload, estimate, memory
from supercluster.plan.profiles import PROFILES, Software, with_switches

# The `switches` column's words -> `profiles.with_switches` arguments.
SWITCHES = {
    "async-tp": ("async_tp", True), "no-async-tp": ("async_tp", False),
    "fp8-all-gather": ("fp8_all_gather", True),
    "fp8-rowwise": ("fp8_recipe", "rowwise"), "mxfp8": ("fp8_recipe", "mxfp8"), "fp8-delayed": ("fp8_recipe", "delayed"),
    "ep-overlap": ("ep_overlap", True), "ep-dedup": ("ep_node_dedup", True), "fp8-dispatch": ("fp8_dispatch", True),
    "bf16-reduce": ("grad_reduce_bytes", 2),
    "torch-ring-cp": ("torch_ring_cp", True),
}
# Switches with a count: `cpu-offload=N` (layers whose activations go to host memory).
VALUED_SWITCHES = {"cpu-offload": "offload_layers"}
# Switches with a list: `recompute-modules=mla_up_proj,mlp` (Megatron-Core's --recompute-modules).
LISTED_SWITCHES = {"recompute-modules": "recompute_modules"}
DEFAULT_CSV = Path(__file__).with_name("calibration") / "published-runs.csv"
METRICS = ("hardware_tflops_per_gpu", "model_tflops_per_gpu", "mfu", "step_time_s", "tokens_per_s_per_gpu")
BOUNDS = {"gemm_efficiency": (0.3, 1.0), "fp8_efficiency": (0.3, 1.0)}
# Layouts kept per row for fitting: the fastest at reference constants. The constants scale
# compute only, so which layouts are fastest barely moves with them; keeping a few instead of
# hundreds makes leave-one-source-out cheap.
KEEP_LAYOUTS = 6
REFERENCE = {"gemm_efficiency": 0.85, "fp8_efficiency": 0.85}

# GPT-2/3 as trained in the Megatron papers: LayerNorm, GELU MLP of 4h, learned positions,
# tied embeddings. Llama 3: RMSNorm, SwiGLU, rotary, untied.
_ARCH = {
    "gelu": dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True),
    "swiglu": dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False),
    # Nemotron: squared-ReLU MLP (two matrices, as GELU's), LayerNorm, rotary, untied, no biases.
    "relu2": dict(norm="layernorm", mlp="gelu", position="rope", bias=False, tie_embeddings=False),
}


@dataclass
class Row:
    label: str
    source: str  # source id: the unit left out
    stack: str
    work: Workload
    system: System
    software: Software
    gpu_count: int
    stated: dict  # layout properties the source states; the others are chosen
    metric: str
    published: float
    peak_memory_gib: float | None  # as the source reports it (PyTorch's peak reserved memory)
    feasible: list | None = field(default=None, repr=False)  # layouts that fit, found once


def _int(text: str):
    return int(text) if text.strip() else None


def _extra(text: str) -> dict:
    """`model_extra`: key=value model fields beyond the shared columns (MoE shapes, head_dim,
    MLA ranks), as `model.config.ModelConfig` names them."""
    out = {}
    for item in text.split():
        key, value = item.split("=", 1)
        out[key] = value == "true" if value in ("true", "false") else (int(value) if value.lstrip("-").isdigit() else value)
    return out


def _parse(r: dict) -> Row | None:
    """A Row, or None when the source gives no GPU count or batch to predict from."""
    if not (r["gpu_count"] and r["global_batch"] and r["layers"]):
        return None
    arch = _ARCH[r["mlp"]]
    model = ModelConfig(
        layers=int(r["layers"]), hidden=int(r["hidden"]), heads=int(r["heads"]), kv_heads=_int(r["kv_heads"]),
        ffn_hidden=_int(r["ffn_hidden"]), vocab_size=int(r["vocab"]), max_seq_len=int(r["seq_len"]),
        **{**arch, **_extra(r.get("model_extra") or "")},
    )
    fixed = {k: _int(r[k]) for k in ("tp", "pp", "dp", "cp", "ep", "microbatch", "virtual_stages") if (r.get(k) or "").strip()}
    for k in ("recompute", "sharding", "pp_schedule"):
        if r[k].strip():
            fixed[k] = r[k].strip()
    if r["sequence_parallel"].strip():
        fixed["sequence_parallel"] = r["sequence_parallel"].strip() == "true"
    if r["stage_layers"].strip():
        fixed["stage_layers"] = tuple(int(x) for x in r["stage_layers"].split())
    sw = PROFILES[r["stack"]]
    if r["compile"] == "eager":  # the run's stated kernel mode (torch.compile off)
        sw = replace(sw, fused_elementwise=False)
    switches = set((r.get("switches") or "").split())  # the run's stated switches on top of its stack
    valued = {k.split("=", 1)[0]: k.split("=", 1)[1] for k in switches if "=" in k}  # e.g. cpu-offload=40
    switches -= {f"{k}={v}" for k, v in valued.items()}
    unknown = (switches - set(SWITCHES)) | (set(valued) - set(VALUED_SWITCHES) - set(LISTED_SWITCHES))
    if unknown:
        raise UserError(f"Calibration row {r['model']} ({r['source_id']}): unknown switch {sorted(unknown)[0]!r}.")
    sw = with_switches(sw, **{SWITCHES[k][0]: SWITCHES[k][1] for k in switches},
                       **{VALUED_SWITCHES[k]: int(v) for k, v in valued.items() if k in VALUED_SWITCHES},
                       **{LISTED_SWITCHES[k]: tuple(v.split(",")) for k, v in valued.items() if k in LISTED_SWITCHES})
    label = f"{r['model']} on {r['gpu_count']} GPUs ({r['source_id']})"
    system = System(accelerator(r["gpu"]), node_type(r["node"]), r["precision"])
    return Row(label, r["source_id"], r["stack"], Workload(model, int(r["seq_len"]), int(r["global_batch"])), system, sw,
               int(r["gpu_count"]), fixed, r["metric"], float(r["published"]),
               float(r["peak_memory_gib"]) if r["peak_memory_gib"].strip() else None)


def load_rows(path: Path = DEFAULT_CSV) -> tuple[list[Row], list[str]]:
    """The rows a prediction can be made for, and the labels of the others."""
    if not path.exists():
        raise UserError(f"Calibration data {path} not found; pass --csv with the path to published-runs.csv.")
    rows, skipped = [], []
    for r in csv.DictReader(path.open()):
        row = _parse(r)
        if row is None:
            skipped.append(f"{r['model']} ({r['source_id']}): no GPU count or batch in the source")
        else:
            rows.append(row)
    return rows, skipped


def _layouts(row: Row):
    """Every layout the row's stated knobs allow, the unstated ones enumerated."""
    f, cfg, w = row.stated, row.work.model, row.work
    total = row.gpu_count
    tps = [f["tp"]] if "tp" in f else [t for t in (1, 2, 4, 8) if cfg.heads % t == 0 and cfg.kv_heads % t == 0]
    cp = f.get("cp", 1)
    for tp in tps:
        rest = total // (tp * cp)
        pps = [f["pp"]] if "pp" in f else [p for p in range(1, rest + 1) if rest % p == 0 and cfg.layers % p == 0 and p <= 64]
        for pp in pps:
            if rest % pp:
                continue
            dp = rest // pp
            if ("dp" in f and f["dp"] != dp) or w.global_batch % dp:
                continue
            mbs = [f["microbatch"]] if "microbatch" in f else [b for b in (1, 2, 4, 8) if (w.global_batch // dp) % b == 0]
            for mb in mbs:
                m = w.global_batch // (dp * mb)
                if m < 1:
                    continue
                if pp == 1:
                    vs, schedule = [1], "1f1b"
                else:
                    schedule = f.get("pp_schedule", "interleaved1f1b" if f.get("virtual_stages", 1) > 1 else "1f1b")
                    if "virtual_stages" in f:
                        vs = [f["virtual_stages"]]
                    elif schedule == "1f1b":
                        vs = [1]
                    else:
                        vs = [v for v in (2, 3, 4, 6, 8) if cfg.layers >= pp * v and m % pp == 0] or [2]  # uneven stages allowed
                experts = getattr(cfg, "moe_experts", 0)
                pool = dp * (tp * cp if row.software.expert_tp_cp else 1)
                eps = [f["ep"]] if "ep" in f else ([e for e in range(1, pool + 1) if pool % e == 0 and experts % e == 0]
                                                  if experts else [1])
                sps = [f["sequence_parallel"]] if "sequence_parallel" in f else ([True, False] if tp > 1 else [False])
                recomputes = [f["recompute"]] if "recompute" in f else ["none", "selective", "full"]
                shardings = [f["sharding"]] if "sharding" in f else list(row.software.shardings)
                for v, sp, rc, sh, ep in itertools.product(vs, sps, recomputes, shardings, eps):
                    if pp > 1 and v > 1 and schedule == "1f1b":
                        schedule = "interleaved1f1b"
                    lay = Layout(tp=tp, pp=pp, dp_shard=dp, cp=cp, sharding=sh, pp_schedule=schedule if pp > 1 else "1f1b",
                                 virtual_stages=v, stage_layers=f.get("stage_layers"), microbatch=mb, recompute=rc,
                                 sequence_parallel=sp)
                    yield replace(lay, ep=ep) if experts else lay


def best(row: Row, constants: dict) -> Estimate:
    """The fastest layout among those the row allows that fits in memory (the nearest miss
    when none does: a published run did fit, so the memory model is the one off)."""
    estimates = [estimate(row.work, lay, row.system, row.software, constants) for lay in _feasible(row)]
    return min(estimates, key=lambda e: e.step_time_s)


def _feasible(row: Row) -> list[Layout]:
    if row.feasible is not None:  # memory does not depend on the fitted constants: found once
        return row.feasible
    cap = row.system.accelerator.hbm_gib
    fits, nearest = [], None
    for lay in _layouts(row):
        m = row.work.global_batch // (lay.dp * lay.microbatch)
        mem = memory(row.work.model, lay, row.software, row.work.seq_len, m, RESERVED_GIB, row.system.precision)["total"]
        if mem <= cap:
            fits.append(lay)
        elif nearest is None or mem < nearest[0]:
            nearest = (mem, lay)
    if not fits and nearest[0] <= cap * (1 + MEMORY_MARGIN):
        fits = [nearest[1]]  # answered with a warning, as `plan` does
    if not fits:
        raise UserError(f"{row.label}: the memory model refuses every layout the source allows (nearest "
                        f"{nearest[0]:.1f} GiB of {cap:.0f}); a published run did fit, so fix the memory model.")
    if len(fits) > KEEP_LAYOUTS:
        ranked = sorted(fits, key=lambda lay: estimate(row.work, lay, row.system, row.software, REFERENCE).step_time_s)
        fits = ranked[:KEEP_LAYOUTS]
    row.feasible = fits
    return row.feasible


def predict(row: Row, constants: dict) -> float:
    return getattr(best(row, constants), row.metric)


def errors(rows: list[Row], constants: dict[str, dict]) -> list[float]:
    """Each row's signed relative error with per-profile constants."""
    return [(predict(row, constants[row.stack]) - row.published) / row.published for row in rows]


def mape(rows: list[Row], constants: dict[str, dict]) -> float:
    errs = errors(rows, constants)
    return sum(map(abs, errs)) / len(errs)


def _golden(objective, lo: float, hi: float, tol: float = 2e-3) -> float:
    ratio = (5**0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = objective(a), objective(b)
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = objective(b)
    return round((lo + hi) / 2, 4)


def _fit_one(rows: list[Row], key: str, fixed: dict) -> float:
    """The value of constant `key` minimising these rows' MAPE, the others as `fixed`."""
    def objective(x):
        errs = [(predict(row, {**fixed, key: x}) - row.published) / row.published for row in rows]
        return sum(map(abs, errs)) / len(errs)

    return _golden(objective, *BOUNDS[key])


def _is_moe(row: Row) -> bool:
    return getattr(row.work.model, "moe_experts", 0) > 0


def _is_fp8(row: Row) -> bool:
    return row.system.precision == "fp8"


def fit(rows: list[Row]) -> dict[str, dict]:
    """Per profile, its two constants fitted on its own rows: the 16-bit GEMM efficiency on
    its 16-bit rows, then the FP8 one on its FP8 rows. A profile without rows of a kind takes
    that constant fitted on all these rows of that kind pooled (each row with its own profile).

    Only dense rows are fitted; MoE rows are judged (leave-one-source-out, intervals) but not
    fitted. The constants are the share of the matmul rate the stack's kernels keep; an MoE
    row's error is dominated by the model's least certain terms (grouped expert GEMMs, the
    all-to-all, routing imbalance: 52% left-out error on Megatron-Bridge's MoE tables), which
    a GEMM efficiency would otherwise absorb and carry into dense predictions. With Together's
    two BF16 MoE rows fitted, the megatron profile's 16-bit constant moved from 0.89 to 0.96
    and the Megatron README's left-out error from 7.8% to 10.8%; fitted on dense rows, 7.3%."""
    dense = [r for r in rows if not _is_moe(r)]
    wide, narrow = [r for r in dense if not _is_fp8(r)], [r for r in dense if _is_fp8(r)]
    pooled_g = _fit_one(wide, "gemm_efficiency", {}) if wide else REFERENCE["gemm_efficiency"]
    pooled_f = (_fit_one(narrow, "fp8_efficiency", {"gemm_efficiency": pooled_g}) if narrow
                else pooled_g)
    out = {}
    for name in PROFILES:
        own16 = [r for r in wide if r.stack == name]
        own8 = [r for r in narrow if r.stack == name]
        g = _fit_one(own16, "gemm_efficiency", {}) if own16 else pooled_g
        f = _fit_one(own8, "fp8_efficiency", {"gemm_efficiency": g}) if own8 else pooled_f
        out[name] = {"gemm_efficiency": g, "fp8_efficiency": f}
    return out


def leave_one_source_out(rows: list[Row]) -> dict[str, dict]:
    """Per source: the constants fitted without it, and its rows' errors under them."""
    out = {}
    for source in dict.fromkeys(r.source for r in rows):
        train = [r for r in rows if r.source != source]
        test = [r for r in rows if r.source == source]
        constants = fit(train)
        errs = errors(test, constants)
        out[source] = {
            "rows": len(test),
            "mape": sum(map(abs, errs)) / len(errs),
            "max_error": max(map(abs, errs)),
            "errors": errs,
            "constants": constants,
        }
    return out


def step_ratios(rows: list[Row], errs: list[float]) -> list[float]:
    """Each row's true step time over the predicted one, from its signed error in its metric
    (throughputs scale as 1/step time, a published step time directly)."""
    return [1 / (1 + e) if row.metric == "step_time_s" else 1 + e for row, e in zip(rows, errs)]


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile, linear between order statistics."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


# A class keeps its own interval with this many left-out residuals from this many sources;
# else it takes the pooled one. One source's residuals are correlated (one team, one cluster,
# one convention): its spread says little about a new source's, and a few sources are a few
# samples of the between-source offset. A class from fewer than MIN_CLASS_SOURCES (but at
# least two) sources is therefore never narrower than the pooled interval: it takes the
# envelope of both, so a class that misses widely (MoE today) still says so. Judged on
# left-out sources (each source against intervals built from the others, tests/test_plan.py;
# 176 rows from 14 sources), own intervals from 2 sources held 63% of the runs inside their
# 80% intervals, from 3 sources 70%; the envelope rule below holds about the stated share.
MIN_CLASS_ROWS = 8
MIN_CLASS_SOURCES = 4


def intervals(rows: list[Row], loso: dict[str, dict], coverage: float = INTERVAL_COVERAGE) -> dict:
    """Per class (stack and precision), the central `coverage` range of the leave-one-source-
    out step-time ratios, and "all" pooled over every row."""
    errs = {id(r): e for source, res in loso.items() for r, e in zip([r for r in rows if r.source == source], res["errors"])}
    ratios: dict[str, list[float]] = {}
    sources: dict[str, set] = {}
    for row in rows:
        ratio = step_ratios([row], [errs[id(row)]])[0]
        for key in (interval_class(row.stack, row.system.precision, _is_moe(row)), "all"):
            ratios.setdefault(key, []).append(ratio)
            sources.setdefault(key, set()).add(row.source)
    tail = (1 - coverage) / 2

    def central(v: list[float]) -> list[float]:
        return [round(_quantile(v, tail), 4), round(_quantile(v, 1 - tail), 4)]

    pooled = central(ratios["all"])
    out = {}
    for key, v in sorted(ratios.items()):
        n_sources = len(sources[key])
        if key != "all" and (len(v) < MIN_CLASS_ROWS or n_sources < 2):
            continue
        low, high = central(v)
        if key != "all" and n_sources < MIN_CLASS_SOURCES:
            low, high = min(low, pooled[0]), max(high, pooled[1])
        out[key] = {"ratio": [low, high], "rows": len(v), "sources": n_sources}
    return out


def report(rows: list[Row], constants: dict[str, dict], loso: dict[str, dict] | None = None) -> None:
    errs = errors(rows, constants)
    for row, err in zip(rows, errs):
        predicted = row.published * (1 + err)
        print(f"{row.label[:70]:70s} {row.metric:22s} published {row.published:9.3f} predicted {predicted:9.3f} ({err:+.1%})")
    print(f"in-sample MAPE over {len(rows)} rows: {sum(map(abs, errs)) / len(errs):.1%} with {constants}")
    if loso:
        print("\nleave-one-source-out (fitted on the other sources, predicting this one):")
        print(f"{'source':24s} {'rows':>4s} {'MAPE':>7s} {'max':>7s}  constants used")
        for source, res in loso.items():
            used = {r.stack for r in rows if r.source == source}
            consts = ", ".join(f"{s} {res['constants'][s]['gemm_efficiency']:.3f}/{res['constants'][s]['fp8_efficiency']:.3f}"
                               for s in sorted(used))
            print(f"{source:24s} {res['rows']:4d} {res['mape']:7.1%} {res['max_error']:7.1%}  {consts}")
        print(f"\n{INTERVAL_COVERAGE:.0%} intervals (true / predicted step time, left-out residuals):")
        for key, iv in intervals(rows, loso).items():
            print(f"{key:24s} {iv['rows']:4d} rows {iv['sources']:2d} sources  {iv['ratio'][0]:.3f} .. {iv['ratio'][1]:.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--check", action="store_true", help="report the checked-in constants and LOSO error, write nothing")
    args = parser.parse_args(argv)
    rows, skipped = load_rows(args.csv)
    for reason in skipped:
        print(f"skipped {reason}")
    loso = leave_one_source_out(rows)
    if args.check:
        report(rows, json.loads(CONSTANTS_FILE.read_text())["constants"], loso)
        return
    constants = fit(rows)
    report(rows, constants, loso)
    out = {
        "constants": constants,
        "fitted_by": "python -m supercluster.plan.calibrate",
        "data": "calibration/published-runs.csv",
        "rows": len(rows),
        "leave_one_source_out_mape": {s: round(v["mape"], 4) for s, v in loso.items()},
        "interval_coverage": INTERVAL_COVERAGE,
        "intervals": intervals(rows, loso),
    }
    write_atomic(CONSTANTS_FILE, json.dumps(out, indent=1) + "\n")
    print(f"wrote {CONSTANTS_FILE}")


if __name__ == "__main__":
    main()
