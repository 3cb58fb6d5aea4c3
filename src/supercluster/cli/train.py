"""`supercluster train`, `supercluster sample` and `supercluster export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from supercluster.cli.flags import JsonOption, SetOption, real
from supercluster.limits import MAX_NEW_TOKENS, MAX_RESTARTS, MAX_SAMPLES, MAX_SEED, MAX_TEMPERATURE


def train(
    config: Optional[Path] = typer.Argument(None, help="TOML config (defaults for anything it leaves out), or a run "
                                                        "directory (imported or trained) to fine-tune into --out."),
    set_: SetOption = None,
    data: Optional[Path] = typer.Option(None, "--data", help="The training data (data.path): text, or a prepared dataset "
                                                           "folder from `supercluster data prepare`."),
    out: Optional[Path] = typer.Option(None, "--out", help="With a run directory: the new run directory to write "
                                                         "(default: RUN_DIR-sft); the source is never changed."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Ranks on this node (torchrun workers; default: the config's launch.nproc, else 1)."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", min=1, help="Nodes in the job (default: the config's launch.nnodes, else 1)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's index, 0..nnodes-1."),
    rdzv: Optional[str] = typer.Option(None, "--rdzv", help="HOST:PORT of the rendezvous, for several nodes."),
    rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Job id shared by all nodes (default: from the config path)."),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, max=MAX_RESTARTS, help="Restart failed workers this many times, resuming from the latest checkpoint."),
    sample: bool = typer.Option(True, "--sample/--no-sample", help="Print a sample from the trained model at the end."),
    as_json: JsonOption = False,
):
    """Train a GPT model, or fine-tune a run directory: one rank in this process, or N ranks through torchrun."""
    from supercluster.errors import UserError
    from supercluster.train.config import load_config
    from supercluster.train.finetune import is_run_dir, start_from
    from supercluster.train.launch import TorchrunSpec, check_run, launch_training

    def launch_of(cfg):
        return TorchrunSpec.for_config(cfg, nproc, nnodes, node_rank=node_rank, rdzv=rdzv, rdzv_id=rdzv_id,
                                       max_restarts=max_restarts)

    overrides = list(set_ or []) + ([f"data.path={json.dumps(str(data))}"] if data is not None else [])
    if config is not None and config.is_dir():
        if any(o.split("=", 1)[0].strip() == "run.dir" for o in overrides):
            raise UserError("Fine-tuning a run directory writes to --out; give --out DIR instead of --set run.dir.")
        if not is_run_dir(config):
            start_from(config, out)  # the sentence for a folder that is not a run
        planned = load_config(config / "config.toml", overrides)
        check_run(planned, launch_of(planned))  # a bad override or layout fails before anything is written
        config = start_from(config, out) / "config.toml"
    elif out is not None:
        raise UserError("--out is for fine-tuning a run directory (supercluster train RUN_DIR --out DIR); a config "
                        "file names its run directory in run.dir.")
    cfg = load_config(config, overrides)
    launch = launch_of(cfg)
    summary = launch_training(cfg, launch)
    if node_rank != 0 or not summary:
        return
    if "already_trained" in summary:
        step = summary["already_trained"]
        print(f"run {cfg.run.dir} is already trained to step {step} (train.steps = {cfg.train.steps}); nothing to do: "
              f"use --set train.steps=M with M > {step} to continue it, or a new run.dir.", file=sys.stderr)
        if as_json:
            print(json.dumps(summary))
        elif summary.get("loss") is not None:
            print_summary(cfg.run.dir, summary)
        return
    if summary.get("stopped_by"):
        from supercluster.train.worker import STOPPED_EXIT

        print(f"stopped by {summary['stopped_by']} at step {summary.get('step', 0)}, checkpointed; "
              f"the same command resumes the run.", file=sys.stderr)
        raise typer.Exit(STOPPED_EXIT)
    if as_json:
        print(json.dumps(summary))
        return
    print_summary(cfg.run.dir, summary)
    if sample:
        from supercluster.train.sample import has_tokenizer, sample_run

        prompt = cfg.run.sample_prompt
        if not has_tokenizer(Path(cfg.run.dir)) and not prompt.replace(" ", "").isdigit():
            print(f"no sample: this run has no tokenizer (pre-tokenized data) and run.sample_prompt {prompt!r} is text; "
                  f"set it to token ids (e.g. --set run.sample_prompt='0') or use `supercluster sample` with ids.")
            return
        for text in sample_run(Path(cfg.run.dir), prompt, cfg.run.sample_tokens, samples=2):
            print("--- sample ---")
            print(text)


def print_summary(run_dir, s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {run_dir}", show_header=False)
    rows = [
        ("steps", f"{s.get('step', 0)}"), ("loss", f"{s.get('loss', float('nan')):.4f}"),
        ("val loss", f"{s['val_loss']:.4f}" if "val_loss" in s else "-"),
        ("tokens/s", f"{s.get('tokens_per_s', 0):,.0f} ({s.get('world_size', 1)} ranks)"),
        ("MFU", f"{100 * s.get('mfu', 0):.1f}% of {s.get('peak_source', '?')}"),
        ("precision", s.get("precision", "?")), ("peak memory", f"{s.get('mem_gib', 0):.2f} GiB per rank"),
        ("layout", s.get("layout", "?")),
    ]
    if s.get("measured_step_time_s") is not None:
        step = f"{s['measured_step_time_s']:.3g} s measured (median)"
        if s.get("predicted_step_time_s"):
            step += f", {s['predicted_step_time_s']:.3g} s predicted by the plan ({s['measured_over_predicted']:.2f}x)"
        rows.append(("step time", step))
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def sample(
    run_dir: Path = typer.Argument(..., help="A run directory (holds config.toml and checkpoints/)."),
    prompt: str = typer.Option(
        "def", "--prompt",
        help="Text to continue; for a run trained on pre-tokenized data without a tokenizer, space-separated token ids "
             "such as '0 17 42' (the continuation is printed as ids too).",
    ),
    tokens: int = typer.Option(200, "--tokens", min=1, max=MAX_NEW_TOKENS, help="New tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", callback=real(0, MAX_TEMPERATURE), help="0 is greedy."),
    top_k: int = typer.Option(50, "--top-k", min=0, help="0 disables."),
    top_p: float = typer.Option(0.95, "--top-p", callback=real(0, 1, low_open=True), help="1.0 disables."),
    samples: int = typer.Option(1, "--samples", min=1, max=MAX_SAMPLES),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a user turn through the run's chat template "
                                                    "and print the assistant's reply (up to its end-of-turn token)."),
):
    """Generate text from a run's latest checkpoint (KV cache; temperature, top-k, top-p)."""
    from supercluster.train.sample import chat_run, sample_run

    run = chat_run if chat else sample_run
    for i, text in enumerate(run(run_dir, prompt, tokens, samples, temperature, top_k or None, top_p, seed)):
        if samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)


def export(
    run_dir: Path = typer.Argument(..., help="A run directory (holds config.toml and checkpoints/)."),
    out: Path = typer.Argument(..., help="The .safetensors file to write."),
    as_json: JsonOption = False,
):
    """Write the latest checkpoint (any layout) as one safetensors file with Llama tensor names."""
    from supercluster.train.export import export_run

    summary = export_run(run_dir, out)
    if as_json:
        print(json.dumps(summary))
        return
    print(f"wrote {summary['path']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
          f"{summary['bytes'] / 2**20:.1f} MiB" + ("" if summary["llama_compatible"] else " (not Llama-architecture)"))


def eval_(
    run_dir: Path = typer.Argument(..., help="A run directory (imported, trained or fine-tuned)."),
    data: Optional[Path] = typer.Option(None, "--data", help="A prepared dataset folder: loss and perplexity over it."),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="A JSONL file of multiple-choice tasks "
                                                              "(question, choices, answer): acc and acc_norm."),
    chat: bool = typer.Option(False, "--chat", help="Ask the tasks' questions through the run's chat template."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Row length for --data (default: the run's train.seq_len)."),
    batch: int = typer.Option(8, "--batch", min=1, max=4096, help="Rows per forward pass for --data."),
    as_json: JsonOption = False,
):
    """Evaluate a run: loss and perplexity on a prepared dataset, accuracy on multiple-choice tasks."""
    from supercluster.errors import UserError
    from supercluster.train.evaluate import data_loss, load_model, score_tasks

    if data is None and tasks is None:
        raise UserError("Give --data DIR (a prepared dataset) or --tasks FILE.jsonl (multiple-choice tasks), or both.")
    if not (Path(run_dir) / "config.toml").is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (it has no config.toml).")
    model, _ = load_model(run_dir)
    result = {"run_dir": str(run_dir)}
    if data is not None:
        result["data"] = data_loss(run_dir, data, seq_len, batch, model=model)
    if tasks is not None:
        result["tasks"] = score_tasks(run_dir, tasks, chat, model=model)
    if as_json:
        print(json.dumps(result))
        return
    if "data" in result:
        d = result["data"]
        print(f"{d['data']}: loss {d['loss']:.4f}, perplexity {d['perplexity']:.2f} over {d['tokens_counted']:,} "
              f"targets of {d['documents']:,} documents (seq_len {d['seq_len']})")
    if "tasks" in result:
        t = result["tasks"]
        print(f"{t['tasks']}: acc {t['acc']:.3f}, acc_norm {t['acc_norm']:.3f} over {t['questions']} questions"
              f"{' (chat template)' if t['chat'] else ''}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
    app.command("train")(train)
    app.command("sample")(sample)
    app.command("export")(export)
