"""The trainer end to end on a tiny model: learning, resume, data parallel, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supercluster.cli.main import main
from supercluster.train.config import load_config
from supercluster.train.launch import TorchrunSpec, launch_training
from supercluster.train.metrics import read_metrics


def tiny_overrides(corpus, run_dir, steps=6, *extra):
    return [
        "model.preset=tiny", f"data.path={corpus}", f"run.dir={run_dir}", "train.precision=fp32",
        "train.seq_len=64", "train.micro_batch=4", "train.global_batch=8", f"train.steps={steps}",
        "train.warmup_steps=2", "train.eval_every=0", "train.checkpoint_every=0", "train.lr=3e-3", *extra,
    ]


def losses(run_dir) -> dict[int, float]:
    """Loss per step; a resumed run logs the replayed steps again, the last entry wins."""
    return {m["step"]: m["loss"] for m in read_metrics(Path(run_dir) / "metrics.jsonl")}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supercluster.cli.main", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_loss_falls_and_run_dir_is_complete(small_corpus, tmp_path):
    cfg = load_config(None, tiny_overrides(small_corpus, tmp_path / "run", 30, "train.eval_every=15",
                                           "train.checkpoint_every=10", "train.keep_checkpoints=2"))
    summary = launch_training(cfg, TorchrunSpec())
    by_step = losses(tmp_path / "run")
    assert sorted(by_step) == list(range(1, 31))
    first, last = by_step[1], sum(by_step[s] for s in range(26, 31)) / 5
    assert last < first - 1.0, (first, last)  # ln(512) ≈ 6.2 at the start
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert {"step", "loss", "lr", "tokens_per_s", "mfu", "mem_gib", "val_loss"} <= record.keys()
    assert 0 < record["mfu"] < 1 and record["tokens_per_s"] > 0 and record["mem_gib"] > 0
    assert summary["peak_source"].startswith("measured:cpu fp32")
    assert (tmp_path / "run" / "config.toml").is_file()
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["step_00000020", "step_00000030"]  # the last K=2 kept


def test_time_limit_ends_the_run_evaluated_checkpointed_and_resumable(small_corpus, tmp_path):
    # A limit that runs out during the first step: that step is the last, and it is treated
    # as the run's end (validation loss, a checkpoint) so that the next launch resumes there.
    overrides = tiny_overrides(small_corpus, tmp_path / "run", 50, "train.eval_every=40", "train.max_minutes=1e-6")
    summary = launch_training(load_config(None, overrides), TorchrunSpec())
    assert summary["step"] == 1 and "val_loss" in summary
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000001"]
    again = launch_training(load_config(None, overrides), TorchrunSpec())
    assert again["step"] == 2 and again["resumed_from"].endswith("step_00000001")


def test_resume_reproduces_uninterrupted_run(small_corpus, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(small_corpus, run, 8, "train.checkpoint_every=4", "train.keep_checkpoints=3")
    launch_training(load_config(None, overrides), TorchrunSpec())
    uninterrupted = losses(run)
    # A crash after step 6: the step-8 checkpoint and later metrics never happened.
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints" / "step_00000009.tmp").mkdir()  # a save that died half-way is ignored
    summary = launch_training(load_config(None, overrides), TorchrunSpec())
    assert summary["resumed_from"].endswith("step_00000004")
    resumed = losses(run)
    for step in range(5, 9):
        assert resumed[step] == uninterrupted[step], step  # identical in fp32


def test_two_rank_data_parallel_matches_one_process(small_corpus, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    launch_training(load_config(None, tiny_overrides(small_corpus, single, 5)), TorchrunSpec())
    sets = [f"--set={o}" for o in tiny_overrides(small_corpus, double, 5)]
    result = cli("train", *sets, "--nproc", "2", "--no-sample")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(single), losses(double)
    assert sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    summary = json.loads((double / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_sample_from_trained_run(small_corpus, tmp_path, capsys):
    launch_training(load_config(None, tiny_overrides(small_corpus, tmp_path / "run", 4)), TorchrunSpec())
    main(["sample", str(tmp_path / "run"), "--prompt", "def ", "--tokens", "20", "--samples", "2"])
    out = capsys.readouterr().out
    assert out.count("def ") >= 2 and "--- sample 2 ---" in out


def test_corrupt_checkpoint_is_one_clear_sentence(small_corpus, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(small_corpus, run, 2)
    launch_training(load_config(None, overrides), TorchrunSpec())
    shard = next((run / "checkpoints" / "step_00000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    result = cli("train", *[f"--set={o}" for o in overrides], "--set=train.steps=4", "--no-sample")
    assert result.returncode == 2
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.path=/no/such/corpus"], "does not exist"),
        (["--set", "train.stpes=3"], "did you mean 'train.steps'"),
        (["--set", "train.global_batch=10"], "divisible"),
        (["--set", "train.seq_len=4096"], "beyond the model's limit"),
        (["--nproc", "1000"], "ranks"),
        (["--set", "train.steps=abc"], "must be of type int"),
        (["--set", "model.preset=gpt5"], "Unknown model preset"),
        (["--set", "train.keep_checkpoints=0"], "train.keep_checkpoints must be at least 1"),
        # A validation split shorter than one sequence: refused, never replaced by training tokens.
        (["--set", "data.val_fraction=0.0001"], "raise data.val_fraction"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(small_corpus, tmp_path, capsys, args, message):
    base = ["--set", "model.preset=tiny", "--set", f"data.path={small_corpus}", "--set", f"run.dir={tmp_path}/run",
            "--set", "train.seq_len=64"]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *base, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_without_validation_a_tiny_split_trains_and_logs_no_val_loss(small_corpus, tmp_path):
    overrides = tiny_overrides(small_corpus, tmp_path / "run", 2, "data.val_fraction=0.0001")  # eval_every=0
    summary = launch_training(load_config(None, overrides), TorchrunSpec())
    assert summary["step"] == 2 and not any("val_loss" in m for m in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_tensorboard_events_hold_the_logged_losses(small_corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    launch_training(load_config(None, tiny_overrides(small_corpus, run, 3, "train.tensorboard=true",
                                                     "train.eval_every=3")), TorchrunSpec())
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(losses(run), rel=1e-6) and sorted(logged) == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/val_loss")] == [3]
    assert {"train/lr", "train/tokens_per_s", "train/mfu", "train/grad_norm"} <= set(events.Tags()["scalars"])


def test_sigterm_checkpoints_the_step_and_the_same_command_resumes(tmp_path, small_corpus):
    """A preemption (or a Slurm requeue, or an operator) sends SIGTERM: the run finishes its
    step, checkpoints it, exits 143, and running the same command again resumes from there."""
    import signal
    import time

    script = Path(sys.executable).with_name("supercluster")
    run = tmp_path / "run"
    def cmd(steps):
        return [str(script), "train", "configs/tiny.toml", "--set", f"run.dir={run}", "--set", f"data.path={small_corpus}",
                "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0", "--no-sample"]

    proc = subprocess.Popen(cmd(100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == [f"step_{steps[-1]:08d}"]  # checkpoint_every=0: only the stop saved one

    resumed = subprocess.run(cmd(steps[-1] + 2), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{steps[-1]:08d}") and summary["step"] == steps[-1] + 2


def test_a_finished_run_is_reported_complete_and_left_as_it_is(tmp_path, small_corpus):
    """`train --json` prints the summary alone on stdout (progress goes to stderr); running a
    finished run again trains nothing, says so, and leaves every file of the run byte-identical."""
    run = tmp_path / "run"
    args = ["train", "configs/tiny.toml", "--json", "--set", f"run.dir={run}", "--set", f"data.path={small_corpus}",
            "--set", "train.steps=3", "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)  # nothing but the JSON
    assert summary["step"] == 3 and "step      3/3" in first.stderr
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "already trained to step 3" in again.stderr and "train.steps=M" in again.stderr
    assert json.loads(again.stdout) == {**summary, "resumed_from": summary["resumed_from"], "already_trained": 3}
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    table = cli(*[a for a in args if a != "--json"])
    assert table.returncode == 0 and "loss" in table.stdout and "nan" not in table.stdout
