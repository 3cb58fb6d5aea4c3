"""One layout for the planner and the trainer: the rules, the balanced stage split, the
planner and the trainer agreeing on what runs (a property test both ways), and plans
emitted, run as printed on CPU ranks, and reported back as the same layout."""

import json
import os
import shlex
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supercluster.errors import UserError
from supercluster.model.config import ModelConfig, preset
from supercluster.parallel.dims import ParallelDims
from supercluster.parallel.layout import PP_SCHEDULES, RECOMPUTE, TRAINER_SHARDING, Layout, balanced_split
from supercluster.plan.build import build_request, train_config
from supercluster.plan.search import search
from supercluster.train.config import Config, apply, layout_of

BIN = Path(sys.executable).parent  # the console script lives beside the interpreter


# ---- the rules and the split ----------------------------------------------------------------------


def test_balanced_split_is_llama3_405b_on_16_stages():
    """Llama 3 405B: 126 layers on 16 stages, one layer fewer on the first and the last stage."""
    assert balanced_split(preset("llama3-405b"), 16) == (7,) + (8,) * 14 + (7,)


def test_balanced_split_keeps_even_splits_and_lightens_the_output_stage():
    assert balanced_split(preset("gpt3-175b"), 8) == (12,) * 8  # its output layer is a third of a block
    seventy = balanced_split(preset("llama3-70b"), 8)  # a 128K vocabulary: the output layer outweighs a block
    assert sum(seventy) == 80 and seventy[-1] == min(seventy) < 10
    tiny = preset("tiny", layers=6)  # the output layer costs about one block here
    split = balanced_split(tiny, 4)
    assert sum(split) == 6 and split[-1] < max(split) and min(split) >= 1


@pytest.mark.parametrize("layout, needle", [
    (Layout(pp=2, stage_layers=(3, 3)), "sums to 6 layers but the model has 4"),
    (Layout(pp=2, stage_layers=(4,)), "lists 1 stages"),
    (Layout(sharding="optimizer"), "not something this training stack runs"),
    (Layout(sharding="zero3"), "is not one of"),
    (Layout(dp_shard=2, sharding="none"), "dp_shard must be 1"),
    (Layout(pp=2, pp_schedule="gpipe", virtual_stages=2), "runs one stage per rank"),
    (Layout(pp=2, pp_schedule="zbvzerobubble", virtual_stages=3), "exactly 2 stages per rank"),
    (Layout(tp=16), "exceeds the 8 GPUs of one node"),
    (Layout(pp=2, dp_shard=2, pp_schedule="zbvzerobubble"), "use sharding keep_gathered"),
    (Layout(pp=2, pp_schedule="dualpipev", microbatch=8), "at least as many microbatches per step as stages"),
    (Layout(recompute="some"), "Recompute 'some'"),
])
def test_each_broken_rule_is_one_sentence(layout, needle):
    model = preset("tiny", layers=4, heads=16, kv_heads=16, hidden=256, ffn_hidden=512)
    problems = layout.problems(model, 64, 16, gpus_per_node=8)
    assert problems and needle in problems[0], problems
    assert all(p.endswith(".") and p.count(". ") == 0 for p in problems)
    with pytest.raises(UserError, match=needle.split(" (")[0]):
        layout.validate(model, 64, 16, gpus_per_node=8)


# ---- planner and trainer agree ------------------------------------------------------------------


def emitted_config(est, req) -> Config:
    """The plan written as the trainer reads it (every key through the config's own parser)."""
    cfg = Config()
    for section, keys in train_config(est, req, steps=2).items():
        for key, value in keys.items():
            apply(cfg, f"{section}.{key}", value)
    return cfg


models = st.builds(
    lambda layers, heads, kv, head_dim, vocab: ModelConfig(layers=layers, hidden=heads * head_dim, heads=heads,
                                                           kv_heads=kv, ffn_hidden=4 * heads * head_dim,
                                                           vocab_size=vocab, max_seq_len=512),
    st.integers(1, 9), st.sampled_from([2, 4, 8]), st.sampled_from([1, 2]), st.sampled_from([8, 16]),
    st.sampled_from([250, 256, 512]),
).filter(lambda m: m.heads % m.kv_heads == 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models, gpus=st.sampled_from([1, 2, 4, 6, 8, 16]), seq=st.sampled_from([64, 96, 128]),
       batch=st.sampled_from([8, 12, 16, 32]))
def test_every_ranked_plan_runs_in_the_trainer(model, gpus, seq, batch):
    """Whatever the planner ranks, the trainer accepts as it is written out, and reads back
    as the very same layout."""
    req = build_request(model, gpus, "h200", seq_len=seq, global_batch=batch)
    try:
        plans = search(req, top=50)
    except UserError:
        return  # nothing fits or divides: a sentence, not a plan
    for est in plans:
        cfg = emitted_config(est, req)
        layout = layout_of(cfg, gpus)
        assert replace(layout, stage_layers=None) == replace(est.layout, stage_layers=None)
        if est.layout.pp > 1:
            assert layout.stage_layers == est.layout.split(cfg.model_config())
        ParallelDims.of(layout, gpus, cfg.model_config(), cfg.train.seq_len, cfg.train.global_batch,
                        req.system.node.gpus_per_node)


layouts = st.builds(
    Layout,
    tp=st.sampled_from([1, 2, 4]), pp=st.sampled_from([1, 2, 3]), dp_replicate=st.just(1),
    dp_shard=st.sampled_from([1, 2, 4]), cp=st.sampled_from([1, 2]), sharding=st.sampled_from(TRAINER_SHARDING),
    pp_schedule=st.sampled_from(list(PP_SCHEDULES)), virtual_stages=st.sampled_from([1, 2, 3]),
    microbatch=st.sampled_from([1, 2, 4]), recompute=st.sampled_from(RECOMPUTE), sequence_parallel=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(layout=layouts, layers=st.integers(2, 8), seq=st.sampled_from([64, 96, 120]), batch=st.sampled_from([8, 16, 24]))
def test_every_layout_the_trainer_accepts_the_planner_prices(layout, layers, seq, batch):
    """And back: a layout the trainer's rules accept (unsharded data parallelism as replicas),
    given to the planner as fixed knobs, is priced as exactly that layout."""
    if layout.sharding == "none":
        layout = replace(layout, dp_replicate=layout.dp_shard, dp_shard=1)
    model = ModelConfig(layers=layers, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab_size=256, max_seq_len=512)
    if layout.problems(model, seq, batch, gpus_per_node=8):
        return
    fixed = dict(tp=layout.tp, pp=layout.pp, dp=layout.dp, cp=layout.cp, microbatch=layout.microbatch,
                 virtual_stages=layout.virtual_stages, sharding=layout.sharding, recompute=layout.recompute,
                 sequence_parallel=layout.sequence_parallel, pp_schedule=layout.pp_schedule)
    req = build_request(model, layout.gpus, "h200", seq_len=seq, global_batch=batch, fixed=fixed)
    plans = search(req, top=5)
    assert [p.layout for p in plans] == [layout]


# ---- plan, config, run: the printed command, on CPU ranks ---------------------------------------------


def cli(*args, env=None, check=True):
    proc = subprocess.run([str(BIN / "supercluster"), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("name, knobs", [
    ("dp 2 x tp 2, full shard", ["--tp", "2", "--dp", "2", "--sharding", "full", "--microbatch", "2"]),
    ("pp 2 x dp 2, weights kept gathered, 3 layers", ["--layers", "3", "--pp", "2", "--dp", "2",
                                                       "--sharding", "keep_gathered"]),
    ("dp 4 replicas, selective recompute", ["--dp", "4", "--sharding", "none", "--recompute", "selective"]),
])
def test_plan_emits_a_config_that_runs_as_printed(small_corpus, tmp_path, name, knobs):
    """`plan --gpu local --emit-config` prints a command; running that very command trains the
    planned layout on 4 CPU ranks, and the run reports the same layout and the prediction."""
    out, run = tmp_path / "plan.toml", tmp_path / "run"
    proc = cli("plan", "tiny", *knobs, "--gpus", "4", "--gpu", "local", "--seq-len", "64", "--global-batch", "8",
               "--steps", "2", "--run-dir", str(run), "--emit-config", str(out), "--json")
    result = json.loads(proc.stdout)
    best, command = result["plans"][0], result["command"]
    # The corpus is the one thing a plan cannot know: the user's data, added to the file.
    with out.open("a") as f:
        f.write(f'\n[data]\npath = "{small_corpus}"\n')
    emitted = tomllib.loads(out.read_text())
    assert emitted["launch"] == {"nproc": 4, "nnodes": 1}
    assert command == f"supercluster train {out}"
    ran = subprocess.run(shlex.split(command) + ["--no-sample", "--json"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert ran.returncode == 0, ran.stderr[-4000:]
    summary = json.loads(ran.stdout.strip().splitlines()[-1])  # progress lines come first
    assert summary["world_size"] == 4 and summary["step"] == 2
    cfg = Config()
    for section, keys in emitted.items():
        for key, value in keys.items():
            apply(cfg, f"{section}.{key}", value)
    layout = layout_of(cfg, 4)
    assert summary["layout"] == layout.describe()
    assert (layout.tp, layout.pp, layout.dp, layout.sharding, layout.recompute) == (
        best["tp"], best["pp"], best["dp"], best["sharding"], best["recompute"])
    assert summary["stage_layers"] == best["stage_layers"]
    assert summary["predicted_step_time_s"] == pytest.approx(best["step_time_s"])
    assert summary["measured_step_time_s"] > 0


@pytest.mark.parametrize("args, needle", [
    (["plan", "tiny", "--gpus", "4", "--gpu", "local", "--pp", "2", "--stage-layers", "1,2", "--global-batch", "8"],
     "sums to 3 layers but the model has 2"),
    (["plan", "tiny", "--gpus", "4", "--gpu", "local", "--sharding", "optimizer", "--global-batch", "8"],
     "not run by the supercluster stack"),
    (["train", "--set", "parallel.sharding=optimizer"], "not something this training stack runs"),
    (["train", "--set", "parallel.pp=2", "--set", "parallel.stage_layers=[1,1,1]", "--nproc", "2"],
     "lists 3 stages but the pipeline has 2"),
    (["train", "--set", "parallel.sharding=replicated"], "is not one of"),
])
def test_bad_layouts_through_the_console_script(tmp_path, args, needle):
    if args[0] == "train":
        args = [*args, "--set", "model.preset=tiny", "--set", "train.seq_len=64", "--set", "train.micro_batch=2",
                "--set", "train.global_batch=8", "--set", f"run.dir={tmp_path / 'run'}", "--no-sample"]
    proc = cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
