"""From what a user types to a plan request, and from a plan to a train config.

The CLI passes its flags straight to `build_request`; `write_config` writes the TOML
`supercluster train` reads (train.config), with only keys the plan decides, its launch size
and the predicted step time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import write_atomic
from supercluster.hardware.catalog import accelerator, default_node_type, node_type
from supercluster.limits import MAX_GLOBAL_BATCH, MAX_GPUS, MAX_SEQ_LEN
from supercluster.model.config import ModelConfig, preset
from supercluster.plan.cost import Estimate, System, Workload
from supercluster.plan.profiles import Software, profile
from supercluster.plan.search import Request, runnable_model

DEFAULT_BATCH_TOKENS = 4 * 2**20  # 4 Mi tokens per step when --global-batch is not given (Llama 3's main stage)


def build_model(name: str | None, **dims) -> ModelConfig:
    """A preset, optionally with dimensions changed, or a model from dimensions alone."""
    dims = {k: v for k, v in dims.items() if v is not None}
    if name:
        return preset(name, **dims)
    missing = [f"--{k}" for k in ("layers", "hidden", "heads") if k not in dims]
    if missing:
        raise UserError(f"Name a model preset or give {', '.join(missing)} (e.g. --layers 32 --hidden 4096 --heads 32).")
    return ModelConfig(**dims).validate()


def build_request(
    model: ModelConfig,
    gpus: int,
    gpu: str = "h100",
    node: str | None = None,
    seq_len: int | None = None,
    global_batch: int | None = None,
    gpus_per_node: int | None = None,
    ib_gbps_per_gpu: float | None = None,
    precision: str | None = None,
    fixed: dict | None = None,
    software: Software | None = None,
    moe_imbalance: float = 1.0,
) -> Request:
    if not 1 <= gpus <= MAX_GPUS:
        raise UserError(f"--gpus must be in 1..{MAX_GPUS:,}, got {gpus:,}.")
    local = gpu.lower() == "local"
    acc = accelerator(gpu, ranks=gpus) if local else accelerator(gpu)
    nt = node_type(node, ranks=gpus) if node else default_node_type(gpu, ranks=gpus)
    if not local and nt.accelerator != acc.name:
        raise UserError(f"Node type {nt.name} holds {nt.accelerator} GPUs, not {acc.name}; drop --node or pick a matching one.")
    changes = {}
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise UserError(f"--gpus-per-node must be at least 1, got {gpus_per_node}.")
        changes["gpus_per_node"] = gpus_per_node
    if ib_gbps_per_gpu is not None:
        if ib_gbps_per_gpu <= 0:
            raise UserError(f"--ib-gbps-per-gpu must be positive, got {ib_gbps_per_gpu}.")
        changes["scale_out_gbps_per_gpu"] = ib_gbps_per_gpu
    nt = dataclasses.replace(nt, **changes) if changes else nt
    # A CPU trains in fp32 (the trainer's "auto" precision); GPUs default to bf16.
    precision = precision or ("fp32" if local else "bf16")
    acc.peak(precision)  # unknown or unsupported precision: a clear error now
    seq_len = model.max_seq_len if seq_len is None else seq_len
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise UserError(f"--seq-len must be in 1..{MAX_SEQ_LEN:,}, got {seq_len:,}.")
    if global_batch is None:
        global_batch = max(1, DEFAULT_BATCH_TOKENS // seq_len)
    if not 1 <= global_batch <= MAX_GLOBAL_BATCH:
        raise UserError(f"--global-batch must be in 1..{MAX_GLOBAL_BATCH:,} sequences, got {global_batch:,}.")
    software = software or profile()
    if precision != "fp8" and (software.fp8_recipe != "tensorwise" or software.fp8_all_gather):
        raise UserError("--fp8-recipe and --fp8-all-gather apply to FP8 training; add --precision fp8 or drop them.")
    if software.fp8_recipe == "mxfp8" and precision == "fp8" and not acc.mx_formats:
        raise UserError(f"--fp8-recipe mxfp8 needs block-scaled FP8 tensor cores (Blackwell: b200); {acc.name} has none, "
                        f"so use tensorwise or rowwise.")
    if local:  # local ranks share cores and talk through gloo: nothing overlaps, no fused attention
        software = dataclasses.replace(software, flash_attention=False, overlap_dp=False, overlap_tp=False)
    if moe_imbalance < 1:
        raise UserError(f"--moe-imbalance is the busiest rank's tokens over the mean, at least 1; got {moe_imbalance}.")
    work = Workload(model, seq_len, global_batch, moe_imbalance)
    return Request(work, System(acc, nt, precision), gpus, software, dict(fixed or {}))


def train_config(est: Estimate, req: Request, steps: int, run_dir: str | None = None, lr: float | None = None,
                 checkpoint_every: int | None = None) -> dict:
    """The sections of a train config (train.config.Config) that run this plan on as many
    ranks as it was planned for, with the prediction kept beside it for the run's summary."""
    lay = est.layout
    cfg = runnable_model(req.work.model, lay)
    model = {"preset": cfg.preset or "small"}
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab_size"):
        model[key] = getattr(cfg, key)
    model["max_seq_len"] = max(cfg.max_seq_len, req.work.seq_len)
    model["tie_embeddings"] = cfg.tie_embeddings
    train = {
        "seq_len": req.work.seq_len,
        "micro_batch": lay.microbatch,
        "global_batch": req.work.global_batch,
        "steps": steps,
        "recompute": lay.recompute,
        "predicted_step_time_s": est.step_time_s,
    }
    if req.system.precision in ("fp32", "bf16"):
        train["precision"] = req.system.precision
    if lr is not None:
        train["lr"] = lr
    if checkpoint_every is not None:
        train["checkpoint_every"] = checkpoint_every
    parallel = lay.parallel_keys(cfg)
    gpn = req.system.node.gpus_per_node
    nproc = min(req.gpus, gpn)
    out = {"model": model, "train": train, "parallel": parallel,
           # The launch size: `supercluster train FILE` starts these ranks, so the file runs as printed.
           "launch": {"nproc": nproc, "nnodes": -(-req.gpus // nproc)}}
    if run_dir:
        out["run"] = {"dir": run_dir}
    return out


def write_config(path: Path, est: Estimate, req: Request, steps: int, run_dir: str | None = None,
                 lr: float | None = None, checkpoint_every: int | None = None) -> str:
    """Write the plan as a train config; returns the command that runs it exactly as written."""
    import tomli_w

    sections = train_config(est, req, steps, run_dir, lr, checkpoint_every)
    header = (f"# Written by `supercluster plan`: the fastest feasible layout for {req.gpus} x "
              f"{req.system.accelerator.name}, predicted {est.step_time_s:.3g} s per step.\n")
    write_atomic(path, header + tomli_w.dumps(sections))
    launch = sections["launch"]
    if launch["nnodes"] > 1:
        # Every node runs the same line with its own --node-rank and the first node's address.
        return (f"supercluster train {path} --nnodes {launch['nnodes']} --node-rank N --rdzv HOST:PORT"
                f"  (on each of the {launch['nnodes']} nodes)")
    return f"supercluster train {path}"
