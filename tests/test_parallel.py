"""4D parallel training on CPU ranks (gloo, real torchrun): every layout trains the same
model to the same losses as one process, checkpoints move between layouts, a killed
worker is restarted and resumes, and the result exports to safetensors.

Each multi-rank run costs a torchrun start (torch imported by every rank on 2 cores), so
runs are shared: the dp 2 x tp 2 run is also the checkpoint the resume tests start from,
and the hsdp 2 x 2 run is the one whose worker is killed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supercluster.cli.main import main
from supercluster.train.config import load_config
from supercluster.train.launch import TorchrunSpec, launch_training
from supercluster.train.metrics import read_metrics

STEPS = 8
CHECKPOINT_AT = 3  # the resume tests continue from here: steps 4..8 in their own layout
REL = 1e-4


def overrides(corpus, run_dir, *extra):
    # 4 layers: 2 pipeline ranks x 2 virtual stages; micro_batch 2: enough microbatches for them.
    return ["model.preset=tiny", "model.layers=4", f"data.path={corpus}", f"run.dir={run_dir}", "train.precision=fp32",
            "train.seq_len=64", "train.micro_batch=2", "train.global_batch=8", f"train.steps={STEPS}",
            "train.warmup_steps=2", "train.eval_every=0", "train.checkpoint_every=0", "train.lr=3e-3", *extra]


def losses(run_dir) -> dict[int, float]:
    """Loss per step; a resumed run logs the replayed steps again, the last entry wins."""
    return {m["step"]: m["loss"] for m in read_metrics(Path(run_dir) / "metrics.jsonl")}


def torchrun(corpus, run_dir, nproc, *extra, max_restarts=0, env=None) -> dict:
    sets = [f"--set={o}" for o in overrides(corpus, run_dir, *extra)]
    args = ["train", *sets, "--nproc", str(nproc), "--max-restarts", str(max_restarts), "--no-sample", "--json"]
    result = subprocess.run([sys.executable, "-m", "supercluster.cli.main", *args], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((Path(run_dir) / "summary.json").read_text())


def assert_same_losses(run_dir, reference, steps):
    got = losses(run_dir)
    assert sorted(got) == sorted(steps) or set(steps) <= set(got), sorted(got)
    for step in steps:
        assert got[step] == pytest.approx(reference[step], rel=REL), (step, got[step], reference[step])


@pytest.fixture(scope="module")
def corpus(small_corpus):
    return small_corpus


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, the same global batch: the losses every layout must reproduce."""
    run = tmp_path_factory.mktemp("single")
    launch_training(load_config(None, overrides(corpus, run)), TorchrunSpec())
    by_step = losses(run)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    return by_step


@pytest.fixture(scope="module")
def tp_run(corpus, tmp_path_factory):
    """dp 2 x tp 2 (sequence parallel on), checkpointing every 3 steps."""
    run = tmp_path_factory.mktemp("dp2_tp2")
    summary = torchrun(corpus, run, 4, "parallel.tp=2", f"train.checkpoint_every={CHECKPOINT_AT}", "train.keep_checkpoints=5")
    return run, summary


@pytest.mark.parametrize("name, nproc, extra", [
    ("pp 2 interleaved 1F1B", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved1f1b", "parallel.virtual_stages=2"]),
    ("tp 2 x pp 2 zero bubble (ZBV)", 4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=zbvzerobubble"]),
])
def test_layout_matches_single_process(corpus, reference, tmp_path, name, nproc, extra):
    summary = torchrun(corpus, tmp_path / "run", nproc, *extra)
    assert summary["world_size"] == nproc and summary["step"] == STEPS
    assert_same_losses(tmp_path / "run", reference, range(1, STEPS + 1))


@pytest.mark.parametrize("name, nproc, extra, stages", [
    ("pp 2, uneven stages 1 + 3, unsharded", 2, ["parallel.pp=2", "parallel.stage_layers=[1,3]", "parallel.sharding=none"],
     [1, 3]),
    ("pp 2 x dp 2 keep_gathered, uneven 3 + 1", 4, ["parallel.pp=2", "parallel.stage_layers=[3,1]",
                                                    "parallel.sharding=keep_gathered"], [3, 1]),
    ("pp 2 x dp 2 zero bubble (ZBV), weights kept gathered", 4, ["parallel.pp=2", "parallel.pp_schedule=zbvzerobubble",
                                                                  "parallel.sharding=keep_gathered"], [1, 1, 1, 1]),
    ("dp 2 replicas x tp 2 without sequence parallelism", 4, ["parallel.tp=2", "parallel.sharding=none",
                                                               "parallel.sequence_parallel=false"], None),
])
def test_layout_choices_match_single_process(corpus, reference, tmp_path, name, nproc, extra, stages):
    """Uneven pipeline stages, unsharded replicas (gradients all-reduced), weights kept gathered,
    and TP without SP train to the single-process losses; the summary names the layout run."""
    summary = torchrun(corpus, tmp_path / "run", nproc, *extra)
    assert summary["stage_layers"] == stages
    if "sharding=none" in " ".join(extra):
        assert " none " in summary["layout"]
    if "sequence_parallel=false" in " ".join(extra):
        assert summary["layout"].endswith("no-sp")
    assert_same_losses(tmp_path / "run", reference, range(1, STEPS + 1))


def test_interleaved_balanced_uneven_split_matches_single_process(corpus, tmp_path):
    """5 layers on pp 2 x 2 virtual stages: the balanced split is uneven (the last stage, with
    the output layer, gets fewer), and interleaved 1F1B still reproduces one process's losses."""
    single, piped = tmp_path / "single", tmp_path / "piped"
    launch_training(load_config(None, overrides(corpus, single, "model.layers=5")), TorchrunSpec())
    summary = torchrun(corpus, piped, 2, "model.layers=5", "parallel.pp=2", "parallel.pp_schedule=interleaved1f1b",
                       "parallel.virtual_stages=2")
    assert sum(summary["stage_layers"]) == 5 and len(set(summary["stage_layers"])) > 1
    assert_same_losses(piped, losses(single), range(1, STEPS + 1))


def test_context_parallel_matches_and_flags_a_straggler(corpus, reference, tmp_path):
    """cp 2 (load-balanced chunks, keys and values all-gathered), full recompute; rank 1 made
    1 s slower per step: the losses still match, and rank 1 is named a straggler with its host."""
    summary = torchrun(corpus, tmp_path / "run", 2, "parallel.cp=2", "train.recompute=full",
                       env={"SUPERCLUSTER_FAULT_SLOW": "1:1.0"})
    assert summary["layout"] == "tp1 pp1 dp1x1 cp2 mb2 full recompute full"
    assert_same_losses(tmp_path / "run", reference, range(1, STEPS + 1))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["stragglers"] == [] for r in records[:3])  # not before a whole window (4 steps) of evidence
    last = records[-1]["stragglers"]
    assert [s["rank"] for s in last] == [1] and last[0]["host"] == os.uname().nodename and last[0]["ratio"] > 1.2
    # Keys and values travel by all-gather (with FSDP's weight gathers over the same cp ranks).
    assert records[1]["comm_bytes"]["all_gather"] > 0


def test_dp2_tp2_matches_and_reports_metrics(reference, tp_run):
    run, summary = tp_run
    assert summary["layout"] == "tp2 pp1 dp1x2 cp1 mb2 full recompute none sp"
    assert_same_losses(run, reference, range(1, STEPS + 1))
    record = read_metrics(run / "metrics.jsonl")[1]  # step 2: the step whose collectives are counted
    assert record["comm_measured"]
    # FSDP gathers the weights (all-gather) and scatters the gradients (reduce-scatter); sequence
    # parallelism adds its own all-gathers and reduce-scatters of activations.
    assert record["comm_bytes"]["all_gather"] > 0 and record["comm_bytes"]["reduce_scatter"] > 0
    assert record["comm_bytes_world"]["all_gather"] >= 4 * record["comm_bytes"]["all_gather"] * 0.99
    assert len(record["step_time_s_by_rank"]) == 4 and all(t > 0 for t in record["step_time_s_by_rank"])
    assert len(record["mem_gib_by_rank"]) == 4 and all(m > 0 for m in record["mem_gib_by_rank"])


@pytest.mark.parametrize("name, nproc, extra", [
    ("dp 4 (fsdp)", 4, []),
    ("pp 2 x dp 2, 1F1B", 4, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
])
def test_checkpoint_from_dp2_tp2_resumes_in_another_layout(corpus, reference, tp_run, tmp_path, name, nproc, extra):
    saved, _ = tp_run
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved / "checkpoints" / f"step_{CHECKPOINT_AT:08d}", run / "checkpoints" / f"step_{CHECKPOINT_AT:08d}")
    summary = torchrun(corpus, run, nproc, *extra)
    assert summary["resumed_from"].endswith(f"step_{CHECKPOINT_AT:08d}")
    assert sorted(losses(run)) == list(range(CHECKPOINT_AT + 1, STEPS + 1))
    assert_same_losses(run, reference, range(CHECKPOINT_AT + 1, STEPS + 1))


def test_killed_worker_restarts_and_resumes_hsdp(corpus, reference, tmp_path):
    """hsdp 2 x 2 with selective recompute and background checkpoints; rank 1 dies after step 5
    (checkpoint at 3, committed after step 4): torchrun restarts the workers, they resume from
    step 3 and finish with the uninterrupted losses (so the background copy was step 3's state)."""
    run, marker = tmp_path / "run", tmp_path / "killed-once"
    summary = torchrun(corpus, run, 4, "parallel.dp_replicate=2", "train.recompute=selective",
                       f"train.checkpoint_every={CHECKPOINT_AT}", "train.async_checkpoint=true", max_restarts=1,
                       env={"SUPERCLUSTER_FAULT_EXIT": f"1:5:{marker}"})
    assert marker.is_file()
    steps_logged = [m["step"] for m in read_metrics(run / "metrics.jsonl")]
    assert steps_logged == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]  # the second attempt replays 4 and 5
    assert summary["resumed_from"].endswith(f"step_{CHECKPOINT_AT:08d}")
    assert summary["layout"] == "tp1 pp1 dp2x2 cp1 mb2 full recompute selective"
    assert_same_losses(run, reference, range(1, STEPS + 1))


CLIP = 0.05  # far below the unclipped gradient norm (about 0.6 here): every step is clipped


@pytest.fixture(scope="module")
def clipped_reference(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("single_clipped")
    launch_training(load_config(None, overrides(corpus, run, f"train.grad_clip={CLIP}")), TorchrunSpec())
    return read_metrics(run / "metrics.jsonl")


@pytest.mark.parametrize("name, extra", [
    ("dp 2 x tp 2", ["parallel.tp=2"]),  # the norm of DTensor shards over tp and fsdp
    ("pp 2 x dp 2", ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),  # each stage holds part of the sum
])
def test_clipped_gradients_match_single_process(corpus, clipped_reference, tmp_path, name, extra):
    """With clipping active the update depends on the whole model's gradient norm, so a layout
    that reduced the norm over only part of the model (one stage, one tp shard) diverges."""
    assert all(m["grad_norm"] > 2 * CLIP for m in clipped_reference)
    torchrun(corpus, tmp_path / "run", 4, f"train.grad_clip={CLIP}", *extra)
    got = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for mine, ref in zip(got, clipped_reference):
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=REL), mine["step"]
        assert mine["loss"] == pytest.approx(ref["loss"], rel=REL), mine["step"]


def test_bf16_on_two_fsdp_ranks_tracks_fp32_and_learns(corpus, reference, tmp_path):
    """Autocast to bf16 with FSDP holding bf16 parameters (fp32 gradient reduction): the loss
    follows the fp32 run to within bf16's rounding and falls."""
    summary = torchrun(corpus, tmp_path / "run", 2, "train.precision=bf16")
    assert summary["precision"] == "bf16" and "dp1x2 " in summary["layout"] and " full " in summary["layout"]
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(reference[step], rel=0.02), (step, got[step], reference[step])
    assert got[STEPS] < got[1] - 0.25, got  # about 6.26 -> 5.85 in fp32 over these 8 steps
    assert max(abs(got[s] - reference[s]) for s in got) > 0  # bf16 really ran: not bit-identical to fp32


def test_export_to_llama_safetensors(tp_run, tmp_path, capsys):
    """The dp 2 x tp 2 checkpoint as one file with Llama names, loadable into a plain model."""
    from safetensors import safe_open

    from supercluster.model.transformer import Transformer
    from supercluster.model.weights import supercluster_name
    from supercluster.train.sample import load_trained

    run, _ = tp_run
    out = tmp_path / "model.safetensors"
    main(["export", str(run), str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["llama_compatible"] and summary["tensors"] == 3 + 9 * 4
    trained = load_trained(run)
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
                "model.layers.2.post_attention_layernorm.weight"} <= names
        config = json.loads(f.metadata()["config"])
        assert config["num_hidden_layers"] == 4 and config["num_key_value_heads"] == 2
        state = {supercluster_name(name): f.get_tensor(name) for name in names}
    rebuilt = Transformer(trained.cfg)
    rebuilt.load_state_dict(state)
    tokens = torch.randint(0, trained.cfg.vocab_size, (2, 16))
    torch.testing.assert_close(rebuilt(tokens), trained(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("args, message", [
    (["--nproc", "4", "--set", "parallel.tp=3"], "not divisible by dp_replicate*tp*pp*cp"),
    (["--nproc", "4", "--set", "parallel.dp_shard=3"], "make the degrees multiply"),
    (["--nproc", "4", "--set", "parallel.tp=4"], "must divide the heads"),
    (["--nproc", "2", "--set", "parallel.tp=2", "--set", "model.ffn_hidden=129"], "must divide model.ffn_hidden"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.stage_layers=[1,2]"], "sums to 3 layers but the model has 4"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.stage_layers=[4]"], "lists 1 stages but the pipeline has 2"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.stage_layers=[0,4]"], "needs at least one layer"),
    (["--nproc", "2", "--set", "parallel.sharding=optimizer"], "not something this training stack runs"),
    (["--nproc", "2", "--set", "parallel.sharding=ful"], "did you mean 'full'"),
    (["--nproc", "4", "--set", "parallel.pp=2", "--set", "parallel.pp_schedule=zbvzerobubble"], "use sharding keep_gathered"),
    (["--nproc", "2", "--set", "parallel.sharding=none", "--set", "parallel.dp_shard=2"], "dp_shard must be 1"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.pp_schedule=1f2b"], "did you mean '1f1b'"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.pp_schedule=interleaved1f1b"], "virtual_stages of at least 2"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.virtual_stages=2"], "runs one stage per rank"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "model.tie_embeddings=true"], "untied embeddings"),
    (["--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.microbatches=3"], "divisor of the per-pipeline batch"),
    (["--nproc", "2", "--set", "parallel.cp=2", "--set", "train.seq_len=66"], "2 x cp"),
    (["--nproc", "4", "--set", "parallel.tp=2", "--set", "parallel.cp=2", "--set", "train.seq_len=36"], "sequence parallelism"),
    (["--nproc", "2", "--set", "parallel.ep=2"], "the model is dense"),
    (["--nproc", "3", "--set", "model.preset=tiny-moe", "--set", "parallel.ep=3"], "must divide the model's 4 experts"),
    (["--nproc", "2", "--set", "model.preset=tiny-moe", "--set", "parallel.ep=4"], "must divide dp_shard"),
    (["--nproc", "2", "--set", "model.preset=tiny-moe", "--set", "model.moe_top_k=5"], "larger than the 4 experts"),
])
def test_invalid_layout_is_one_sentence(corpus, tmp_path, capsys, args, message):
    base = [x for o in overrides(corpus, tmp_path / "run") for x in ("--set", o)]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *base, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()
