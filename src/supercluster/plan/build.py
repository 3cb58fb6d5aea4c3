"""From what a user types to a plan request, and from a plan to a train config.

The CLI passes its flags straight to `build_request`; `train_config` writes the TOML
sections `supercluster train` reads (train.config), with only keys the plan decides.
"""

from __future__ import annotations

import dataclasses

from supercluster.errors import UserError
from supercluster.hardware.catalog import accelerator, default_node_type, node_type
from supercluster.model.config import ModelConfig, preset
from supercluster.plan.cost import Estimate, System, Workload
from supercluster.plan.profiles import Software, profile
from supercluster.plan.search import Request

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
) -> Request:
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}.")
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
    seq_len = seq_len or model.max_seq_len
    if seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}.")
    if global_batch is None:
        global_batch = max(1, DEFAULT_BATCH_TOKENS // seq_len)
    if global_batch < 1:
        raise UserError(f"--global-batch must be at least 1 sequence, got {global_batch}.")
    # Local ranks share cores and talk through gloo: nothing overlaps, no fused attention.
    software = software or profile()
    if local:  # local ranks share cores and talk through gloo: nothing overlaps, no fused attention
        software = dataclasses.replace(software, flash_attention=False, overlap_dp=False, overlap_tp=False)
    return Request(Workload(model, seq_len, global_batch), System(acc, nt, precision), gpus, software, dict(fixed or {}))


def train_config(
    est: Estimate, req: Request, steps: int, run_dir: str | None = None, lr: float | None = None,
    checkpoint_every: int | None = None,
) -> dict:
    """The sections of a train config (train.config.Config) that run this plan."""
    cfg, lay = req.work.model, est.layout
    model = {"preset": cfg.preset or "small"}
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab_size"):
        model[key] = getattr(cfg, key)
    if lay.tp > 1 and cfg.vocab_size % lay.tp:
        # The vocabulary is split over tp ranks: pad it to a multiple of 128*tp, as Megatron-LM
        # does (unused rows; GPT-2's 50257 becomes 51200 at tp 8).
        model["vocab_size"] = -(-cfg.vocab_size // (128 * lay.tp)) * 128 * lay.tp
    model["max_seq_len"] = max(cfg.max_seq_len, req.work.seq_len)
    if lay.pp > 1 and cfg.tie_embeddings:
        model["tie_embeddings"] = False  # first and last stages each hold their own (the plan counts both)
    train = {
        "seq_len": req.work.seq_len,
        "micro_batch": lay.microbatch,
        "global_batch": req.work.global_batch,
        "steps": steps,
        "recompute": lay.recompute,
    }
    if lr is not None:
        train["lr"] = lr
    if checkpoint_every is not None:
        train["checkpoint_every"] = checkpoint_every
    sharded = lay.sharding != "none"
    m = req.work.global_batch // (lay.dp * lay.microbatch)
    parallel = {
        "dp_replicate": 1 if sharded else lay.dp,
        "dp_shard": lay.dp if sharded else 1,
        "tp": lay.tp,
        "pp": lay.pp,
        "cp": lay.cp,
        "pp_schedule": "interleaved1f1b" if lay.virtual_stages > 1 else "1f1b",  # parallel.dims.PP_SCHEDULES
        "virtual_stages": lay.virtual_stages,
    }
    if lay.pp > 1:
        parallel["microbatches"] = m
    out = {"model": model, "train": train, "parallel": parallel}
    if run_dir:
        out["run"] = {"dir": run_dir}
    return out
