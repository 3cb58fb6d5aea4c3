"""`supercluster data prepare`: text, JSON lines, Parquet or a saved dataset -> a prepared folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from supercluster.cli.flags import JsonOption

data_app = typer.Typer(help="Datasets: tokenize corpora into prepared folders that training reads.", no_args_is_help=True)


@data_app.command("prepare")
def prepare(
    inputs: list[Path] = typer.Argument(..., help="Files or folders: text, .jsonl (.gz, .zst), .parquet, a save_to_disk folder."),
    out: Path = typer.Option(..., "--out", help="The prepared folder to create (built under a temporary name, renamed whole)."),
    field: Optional[str] = typer.Option(None, "--field", help="The column holding the text (default: text; messages with --format chat)."),
    fmt: str = typer.Option("text", "--format", help="text: one document per row; chat: rows of OpenAI-style messages, loss on assistant turns."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A run directory (an imported model's) or a tokenizer.json; default: train one on the inputs."),
    vocab_size: int = typer.Option(4096, "--vocab-size", min=257, max=65535, help="Vocabulary of the tokenizer trained when --tokenizer is not given."),
    workers: int = typer.Option(1, "--workers", min=1, max=256, help="Tokenizer processes."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed rows (counted in meta.json) instead of stopping at the first."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing prepared folder at --out (only once the new one is complete)."),
    as_json: JsonOption = False,
):
    """Tokenize inputs into a prepared dataset folder (tokens.bin, docs.idx, meta.json) for data.path or data.mix."""
    from supercluster.data.pipeline import prepare as run

    meta = run(inputs, out, field_name=field, fmt=fmt, tokenizer=tokenizer, vocab_size=vocab_size, workers=workers,
               skip_bad=skip_bad, overwrite=overwrite, show_progress=not as_json and sys.stderr.isatty())
    if as_json:
        print(json.dumps({"out": str(out), **meta}))
        return
    skipped = sum(meta["skipped_bad"].values())
    print(f"prepared {out}: {meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta['dtype']}, vocabulary "
          f"{meta['vocab_size']:,}) in {meta['seconds']:.1f} s" + (f"; skipped {skipped:,} bad rows" if skipped else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
