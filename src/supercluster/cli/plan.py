"""`supercluster plan`: predict and choose the parallel layout of a model on N GPUs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from supercluster.cli.flags import JsonOption, real
from supercluster.errors import UserError

JSON_KEYS = (
    "stack", "tp", "pp", "dp", "dp_replicate", "dp_shard", "cp", "ep", "microbatch", "virtual_stages", "pp_schedule",
    "stage_layers", "sharding", "recompute", "sequence_parallel",
    "step_time_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu", "hfu",
    "memory_gib_per_gpu", "memory_breakdown_gib", "bubble_fraction", "exposed_comm_s", "warnings", "terms_s",
    "step_time_s_low", "step_time_s_high", "mfu_low", "mfu_high", "interval_class",
)


def model_notes(req) -> list[str]:
    """What the prediction assumes about the model that a user should know."""
    cfg, notes = req.work.model, []
    if getattr(cfg, "attention", "gqa") == "mla":
        notes.append("multi-head latent attention (MLA) is costed from its parameter counts (its projections as "
                     "GEMMs of those weights, scores over head_dim + rope_head_dim), not from its own kernels")
    if getattr(cfg, "moe_experts", 0):
        notes.append(f"MoE: FLOPs of the active experts (top-{cfg.moe_top_k} of {cfg.moe_experts}"
                     + (f" + {cfg.moe_shared_experts} shared" if cfg.moe_shared_experts else "")
                     + f"), load imbalance factor {req.work.moe_imbalance:g} (--moe-imbalance)")
    return notes


def switches_of(sw) -> dict:
    """The switches a prediction assumed, as `plan` takes them."""
    return {"compile": sw.fused_elementwise, "async_tp": sw.overlap_tp, "fp8_recipe": sw.fp8_recipe,
            "fp8_all_gather": sw.fp8_all_gather}


def plan(
    model: Optional[str] = typer.Argument(None, help="Model preset (gpt3-175b, llama3-70b, ...); or give --layers --hidden --heads."),
    layers: Optional[int] = typer.Option(None, "--layers"),
    hidden: Optional[int] = typer.Option(None, "--hidden"),
    heads: Optional[int] = typer.Option(None, "--heads"),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads"),
    ffn_hidden: Optional[int] = typer.Option(None, "--ffn-hidden"),
    vocab: Optional[int] = typer.Option(None, "--vocab"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default: the model's context)."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per optimizer step (default: ~4M tokens)."),
    gpus: int = typer.Option(..., "--gpus", help="GPUs to plan for."),
    gpu: str = typer.Option("h100", "--gpu", help="a100-40gb, a100-80gb, h100, h200, mi300x, b200 or local."),
    node: Optional[str] = typer.Option(None, "--node", help="Node type, e.g. nd-h100-v5 (default: the GPU's usual node)."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node"),
    ib_gbps_per_gpu: Optional[float] = typer.Option(None, "--ib-gbps-per-gpu", callback=real(0, low_open=True), help="Scale-out Gb/s per GPU."),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16 or fp8 (default bf16; fp32 for local)."),
    tp: Optional[int] = typer.Option(None, "--tp"),
    pp: Optional[int] = typer.Option(None, "--pp"),
    dp: Optional[int] = typer.Option(None, "--dp"),
    cp: Optional[int] = typer.Option(None, "--cp"),
    ep: Optional[int] = typer.Option(None, "--ep", help="Expert parallel degree (MoE models; searched when not given)."),
    moe_imbalance: float = typer.Option(1.0, "--moe-imbalance", callback=real(1.0),
                                        help="MoE: the busiest expert-parallel rank's tokens over the mean (1 = balanced)."),
    microbatch: Optional[int] = typer.Option(None, "--microbatch"),
    virtual_stages: Optional[int] = typer.Option(None, "--virtual-stages"),
    sharding: Optional[str] = typer.Option(
        None, "--sharding", help="none, optimizer, keep_gathered or full (searched among what --stack runs)."
    ),
    pp_schedule: Optional[str] = typer.Option(None, "--pp-schedule", help="1f1b, interleaved1f1b, ..."),
    stage_layers: Optional[str] = typer.Option(None, "--stage-layers", help="Layers per pipeline stage, e.g. 15,16,16,15."),
    stack: str = typer.Option("supercluster", "--stack", help="Software profile: supercluster, megatron, megatron-2021 or deepspeed."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile's fused elementwise kernels (default: the stack's)."),
    async_tp: Optional[bool] = typer.Option(None, "--async-tp/--no-async-tp", help="TP collectives overlapped with their GEMMs (AsyncTP)."),
    fp8_recipe: Optional[str] = typer.Option(None, "--fp8-recipe", help="FP8 scaling: tensorwise, rowwise or mxfp8 (with --precision fp8)."),
    fp8_all_gather: Optional[bool] = typer.Option(None, "--fp8-all-gather/--no-fp8-all-gather", help="FSDP weight all-gathers in FP8."),
    ep_overlap: Optional[bool] = typer.Option(None, "--ep-overlap/--no-ep-overlap", help="MoE all-to-alls hidden under compute (DualPipe)."),
    ep_dedup: Optional[bool] = typer.Option(None, "--ep-dedup/--no-ep-dedup", help="MoE dispatch sends a token once per remote node, fanned out over NVLink there (DeepEP, DeepSeek-V3)."),
    fp8_dispatch: Optional[bool] = typer.Option(None, "--fp8-dispatch/--no-fp8-dispatch", help="MoE dispatch all-to-all in FP8, combine in 16 bits (DeepSeek-V3)."),
    cpu_offload_layers: Optional[int] = typer.Option(None, "--cpu-offload-layers", help="Layers per pipeline rank whose activations wait in host memory for the backward (Megatron-Core cpu_offloading_num_layers)."),
    recompute_modules: Optional[str] = typer.Option(None, "--recompute-modules", help="With --recompute selective: the modules rebuilt in the backward, comma-separated (Megatron-Core's --recompute-modules: core_attn, moe_act, layernorm, mla_up_proj, mlp, moe, shared_experts)."),
    explain: bool = typer.Option(False, "--explain", help="Print each term of the best layout's step time."),
    failures_per_gpu_hour: Optional[float] = typer.Option(
        None, "--failures-per-gpu-hour", callback=real(0), help="Unexpected interruptions per GPU-hour (default: Llama 3's 419 in 54 days on 16,384 GPUs)."
    ),
    checkpoint_gbps: Optional[float] = typer.Option(None, "--checkpoint-gbps", callback=real(0, low_open=True), help="Checkpoint write GB/s (default 2000)."),
    restart_min: Optional[float] = typer.Option(None, "--restart-min", callback=real(0), help="Minutes to restart after a failure (default 10)."),
    recompute: Optional[str] = typer.Option(None, "--recompute", help="none, selective or full"),
    sequence_parallel: Optional[bool] = typer.Option(None, "--sequence-parallel/--no-sequence-parallel"),
    tokens: Optional[float] = typer.Option(None, "--tokens", callback=real(0, low_open=True), help="Training tokens, for time and cost to train."),
    price: Optional[float] = typer.Option(None, "--price", callback=real(0), help="Price per GPU-hour, for the cost to train."),
    top: int = typer.Option(10, "--top", min=1, max=1000, help="Layouts to show."),
    wide: bool = typer.Option(False, "--wide", help="Every column (TFLOP/s, HFU, stage split); the default fits 100 columns."),
    as_json: JsonOption = False,
    emit_config: Optional[Path] = typer.Option(None, "--emit-config", help="Write the best plan as a train config (TOML)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="train.steps in the emitted config (default: from --tokens, else 100)."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=real(0, low_open=True), help="train.lr in the emitted config."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="run.dir in the emitted config."),
):
    """Rank the parallel layouts of a model on N GPUs: step time, MFU, memory, bubble, communication."""
    from supercluster.plan.build import build_model, build_request
    from supercluster.plan.cost import stage_split
    from supercluster.plan.search import search

    cfg = build_model(model, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn_hidden=ffn_hidden, vocab_size=vocab)
    stages = None
    if stage_layers is not None:
        try:
            stages = [int(x) for x in stage_layers.split(",")]
        except ValueError:
            raise UserError(f"--stage-layers must be comma-separated layer counts like 7,8,8,7, got {stage_layers!r}.") from None
    knobs = dict(
        tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, microbatch=microbatch, virtual_stages=virtual_stages,
        sharding=sharding, recompute=recompute, sequence_parallel=sequence_parallel, pp_schedule=pp_schedule,
        stage_layers=stages,
    )
    fixed = {k: v for k, v in knobs.items() if v is not None}
    if recompute_modules is not None and recompute not in (None, "selective"):  # it would change nothing
        raise UserError(f"--recompute-modules names what selective recompute rebuilds; drop it or pass --recompute selective, "
                        f"not {recompute!r}.")
    if not cfg.is_moe:  # MoE-only switches on a dense model would be accepted and change nothing
        given = [flag for flag, v in (("--moe-imbalance", moe_imbalance != 1.0), ("--ep-overlap", ep_overlap),
                                      ("--ep-dedup", ep_dedup), ("--fp8-dispatch", fp8_dispatch)) if v is not None and v is not False]
        if given:
            raise UserError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to Mixture-of-Experts models; "
                            f"{repr(model) if model else 'the model given'} is dense.")
    from supercluster.plan.goodput import DEFAULT_RESTART_S, DEFAULT_WRITE_GBPS, LLAMA3_FAILURES_PER_GPU_HOUR, training_time
    from supercluster.plan.profiles import profile, with_switches

    software = with_switches(profile(stack), compile=compile, async_tp=async_tp, fp8_recipe=fp8_recipe,
                             fp8_all_gather=fp8_all_gather, ep_overlap=ep_overlap,
                             ep_node_dedup=ep_dedup, fp8_dispatch=fp8_dispatch, offload_layers=cpu_offload_layers,
                             recompute_modules=None if recompute_modules is None else
                             tuple(m.strip() for m in recompute_modules.split(",") if m.strip()))
    req = build_request(
        cfg, gpus, gpu, node, seq_len, global_batch, gpus_per_node, ib_gbps_per_gpu, precision, fixed, software,
        moe_imbalance=moe_imbalance,
    )
    plans = search(req, top=top)
    step_tokens = req.work.global_batch * req.work.seq_len

    from supercluster.model.config import num_params

    failures = dict(
        failures_per_gpu_hour=LLAMA3_FAILURES_PER_GPU_HOUR if failures_per_gpu_hour is None else failures_per_gpu_hour,
        write_gbps=DEFAULT_WRITE_GBPS if checkpoint_gbps is None else checkpoint_gbps,
        restart_s=DEFAULT_RESTART_S if restart_min is None else 60 * restart_min,
    )
    rows = []
    for est in plans:
        row = {k: v for k, v in est.as_dict().items() if k in JSON_KEYS}
        row["switches"] = switches_of(req.software)
        if est.layout.pp > 1:  # the split the trainer will run, balanced when not given
            model = req.work.model
            row["stage_layers"] = list(est.layout.split(model) if est.layout.num_stages <= model.layers
                                       else stage_split(model, est.layout))  # Megatron's embedding/loss-only stages
        # Checkpoint interval and effective training time do not depend on the run's length;
        # days and cost need --tokens.
        timing = training_time(
            est.step_time_s, step_tokens, tokens or step_tokens, gpus, num_params(cfg), price if tokens else None, **failures
        )
        if not tokens:
            timing = {k: v for k, v in timing.items() if not k.startswith("train_")}
        row.update(timing)
        rows.append(row)

    command = None
    if emit_config:
        from supercluster.plan.build import write_config

        n_steps = steps or (max(1, round(tokens / step_tokens)) if tokens else 100)
        command = write_config(emit_config, plans[0], req, n_steps, run_dir, lr,
                               checkpoint_every=rows[0]["checkpoint_every_steps"])

    if as_json:
        print(json.dumps({"stack": req.software.name, "notes": model_notes(req), "plans": rows,
                          **({"config": str(emit_config), "command": command} if command else {})}))
        return
    _print_table(req, rows, emit_config, command, wide, explain)


def _layout_cell(r: dict, wide: bool) -> str:
    """tp8 pp4 dp32 mb1 sp: the degrees, leaving out cp and virtual stages of 1 (all of them with --wide)."""
    cell = f"tp{r['tp']} pp{r['pp']} dp{r['dp']}"
    cell += f" ep{r['ep']}" if r.get("ep", 1) > 1 else ""
    cell += f" cp{r['cp']}" if wide or r["cp"] > 1 else ""
    cell += f" mb{r['microbatch']}"
    cell += f" v{r['virtual_stages']}" if wide or r["virtual_stages"] > 1 else ""
    cell += " sp" if r["sequence_parallel"] and r["tp"] > 1 else ""
    if wide and r["stage_layers"]:
        cell += f" stages {'/'.join(map(str, r['stage_layers']))}"
    return cell


def _money(x: float) -> str:
    """91.3M, 250k, 812: the cost column's short form."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"


SHORT = {"keep_gathered": "kept", "optimizer": "optim", "selective": "sel"}  # narrow cells for the default table
TABLE_WIDTH = 100  # the default table's width on a pipe, in a file or a narrow terminal


def _print_table(req, rows: list[dict], emitted: Optional[Path], command: Optional[str], wide: bool = False,
                 explain: bool = False) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from supercluster.model.config import num_params

    work, system = req.work, req.system
    title = (
        f"{work.model.preset or 'custom model'} ({num_params(work.model) / 1e9:.2f}B params), seq {work.seq_len}, "
        f"batch {work.global_batch} seqs on {req.gpus} x {system.accelerator.name} ({system.node.name}, {system.precision}), "
        f"stack {req.software.name}"
    )
    caption = ("step 80%: the range 80% of published runs fell in when their source was left out of the fit; "
               "GiB: memory per GPU (! over HBM within the memory model's error); bubble: (p-1)/(v*m); days*, cost: failures included"
               + ("; comm s: communication not hidden behind compute, per step" if wide
                  else "; --wide: TFLOP/s, HFU, exposed communication, stage split; --explain: the step term by term"))
    # One space between columns (not rich's two): the default table fits 100 columns without cutting a value.
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, padding=0, pad_edge=False)
    columns = [  # (header, cell, shown without --wide)
        ("layout", lambda r: _layout_cell(r, wide), True),
        ("shard", lambda r: r["sharding"] if wide else SHORT.get(r["sharding"], r["sharding"]), True),
        ("recomp", lambda r: r["recompute"] if wide else SHORT.get(r["recompute"], r["recompute"]), True),
        ("step s", lambda r: f"{r['step_time_s']:.3g}", True),
        ("step 80%", lambda r: f"{r['step_time_s_low']:.3g}-{r['step_time_s_high']:.3g}", True),
        ("tok/s/GPU", lambda r: f"{r['tokens_per_s_per_gpu']:,.0f}", True),
        ("model TF", lambda r: f"{r['model_tflops_per_gpu']:.4g}", False),
        ("hw TF", lambda r: f"{r['hardware_tflops_per_gpu']:.4g}", False),
        ("MFU", lambda r: f"{100 * r['mfu']:.1f}%", True),
        ("HFU", lambda r: f"{100 * r['hfu']:.1f}%", False),
        ("GiB", lambda r: f"{r['memory_gib_per_gpu']:.1f}" + ("!" if r.get("warnings") else ""), True),
        ("bubble", lambda r: f"{100 * r['bubble_fraction']:.1f}%", True),
        ("comm s", lambda r: f"{r['exposed_comm_s']:.3g}", False),
    ]
    if any("train_days" in r for r in rows):
        columns.append(("days*", lambda r: f"{r['train_days']:.1f}", True))
    if any("train_cost" in r for r in rows):
        columns.append(("cost", lambda r: f"{r['train_cost']:,.0f}" if wide else _money(r["train_cost"]), True))
    columns = [(h, cell) for h, cell, default in columns if wide or default]
    for h, _ in columns:
        table.add_column(h, justify="left" if h == "layout" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    console = Console()
    if not console.is_terminal:  # a pipe or file gets the whole table: 100 columns, or as wide as --wide needs
        console = Console(width=max(TABLE_WIDTH, Console(width=10_000).measure(table).maximum) if wide else TABLE_WIDTH)
    console.print(table)
    mem = rows[0]["memory_breakdown_gib"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in mem.items() if k != "total")
    console.print(f"best layout memory per GPU (GiB): {parts}; of {system.accelerator.hbm_gib:.0f} GiB")
    console.print(f"GPU: {system.accelerator.describe()}")
    best = rows[0]
    console.print(
        f"failures: job MTBF {best['mtbf_hours']:.1f} h; checkpoint ({best['checkpoint_write_s']:.0f} s to write) every "
        f"{best['checkpoint_every_steps']} steps ({best['checkpoint_interval_s'] / 60:.0f} min, Young/Daly); effective "
        f"training time {100 * best['effective_training_fraction']:.1f}%"
        + (f"; {best['train_days']:.1f} days with failures, {best['train_days_without_failures']:.1f} without" if "train_days" in best else "")
    )
    for note in model_notes(req):
        console.print(f"note: {note}")
    for warning in best.get("warnings", []):
        console.print(f"warning (best layout): {warning}")
    if explain:
        console.print(f"step time of the best layout, term by term (s; they add up to {best['step_time_s']:.4g} s):")
        for name, seconds in best["terms_s"].items():
            if seconds > 0:
                console.print(f"  {seconds:10.4g}  {100 * seconds / best['step_time_s']:5.1f}%  {name}")
    if emitted:
        console.print(f"wrote {emitted}: run it with `{command}`")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
