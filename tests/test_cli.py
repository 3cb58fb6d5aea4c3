"""The `supercluster` command as a user meets it: usage errors and runs without a tokenizer,
through the installed console script (not a test runner's in-process invoker)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(sys.executable).with_name("supercluster")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=os.environ)


@pytest.mark.parametrize("args, words", [
    (["plan", "--model", "x", "--gpus", "8"], "No such option: --model"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["cluster", "create", "x", "--gpu", "8"], "--gpus"),  # the option they meant is named
    (["plan", "llama3-8b"], "Missing option '--gpus'"),
    (["plan", "llama3-8b", "--gpus", "many"], "Invalid value for '--gpus'"),
    (["job", "status"], "Missing argument"),
    (["train", "a.toml", "b.toml"], "unexpected extra argument"),
    (["health", "--level"], "requires an argument"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line_and_exit_2(args, words):
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and words in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_pretokenized_run_samples_token_ids(tmp_path):
    """A nanoGPT-style .bin without a tokenizer trains to the end, then samples in token ids."""
    rng = np.random.default_rng(0)
    (rng.integers(0, 500, size=20_000) % 500).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    run = tmp_path / "run"
    out = cli("train", "configs/tiny.toml", "--set", f"data.path={tmp_path / 'tokens.bin'}", "--set", f"run.dir={run}",
              "--set", "train.steps=2", "--set", "train.eval_every=0")
    assert out.returncode == 0, out.stderr
    assert "no sample: this run has no tokenizer" in out.stdout  # the default text prompt is not ids

    out = cli("sample", str(run), "--prompt", "1 2 3", "--tokens", "5", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    ids = out.stdout.split()
    assert ids[:3] == ["1", "2", "3"] and len(ids) == 8 and all(0 <= int(i) < 512 for i in ids)

    out = cli("sample", str(run), "--prompt", "def", "--tokens", "5")
    assert out.returncode == 2 and "space-separated token ids" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
