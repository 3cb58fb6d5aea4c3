"""The planner: accuracy on published runs, the paper formulas it is built from, the search,
and the `supercluster plan` command end to end (bad input exits 2 with one sentence)."""

import json
import os
import subprocess
import sys
import tomllib

import pytest

from supercluster.errors import UserError
from supercluster.model.config import ModelConfig, layer_params
from supercluster.plan import calibrate
from supercluster.plan.build import build_model, build_request
from supercluster.plan.cost import CONSTANTS_FILE, Layout, Software, _activation_bytes_per_layer, estimate, load_constants
from supercluster.plan.search import search

GPT = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True)
GPT3 = ModelConfig(layers=96, hidden=12288, heads=96, vocab_size=51200, max_seq_len=2048, **GPT)
MEGATRON_2021 = Software(flash_attention=False, overlap_dp=False, grad_reduce_bytes=2)  # as in Narayanan et al. 2021


# ---- accuracy against published runs ------------------------------------------------------------


@pytest.fixture(scope="module")
def rows():
    if not calibrate.DEFAULT_CSV.exists():
        pytest.skip(f"calibration data not present at {calibrate.DEFAULT_CSV}")
    found, _ = calibrate.load_rows()
    return found


def test_published_runs_predicted_within_10_percent_mape(rows):
    assert len(rows) >= 40  # every row with a model, GPU count, batch and figure is used
    total, errors = calibrate.mape(rows, load_constants())
    assert total <= 0.10
    assert max(map(abs, errors)) < 0.30  # no row is wildly off either


def test_constants_are_few_global_and_reproducible(rows):
    stored = json.loads(CONSTANTS_FILE.read_text())
    assert len(stored["constants"]) <= 3
    refit = calibrate.fit(rows)
    for key, value in refit.items():
        assert value == pytest.approx(stored["constants"][key], abs=0.01)


def test_each_source_is_predicted_on_its_own_convention(rows):
    by_metric = {row.metric for row in rows}
    assert by_metric == {"hardware_tflops_per_gpu", "model_tflops_per_gpu", "mfu", "step_time_s"}


# ---- the paper formulas --------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 8])
def test_activation_memory_is_korthikanti_table_2(t):
    s, b, h, a = 2048, 2, GPT3.hidden, GPT3.heads
    sbh = s * b * h

    def act(recompute, sp):
        return _activation_bytes_per_layer(GPT3, Layout(tp=t, microbatch=b, recompute=recompute, sequence_parallel=sp), MEGATRON_2021, s)

    assert act("none", False) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))  # eq. 2
    assert act("none", True) == pytest.approx(sbh / t * (34 + 5 * a * s / h))  # eq. 4
    assert act("selective", False) == pytest.approx(sbh * (10 + 24 / t))
    assert act("selective", True) == pytest.approx(34 * sbh / t)
    assert act("full", False) == pytest.approx(2 * sbh)


def test_flops_bubble_and_memory_of_one_layout():
    req = build_request(GPT3, 64, "a100-80gb", seq_len=2048, global_batch=64, software=MEGATRON_2021)
    lay = Layout(tp=8, pp=8, dp_shard=1, microbatch=1, virtual_stages=3, sharding="none", recompute="selective",
                 sequence_parallel=True, pp_schedule="interleaved1f1b")
    est = estimate(req.work, lay, req.system, req.software)
    B, L, s, h, V = 64, 96, 2048, 12288, 51200
    model_flops = 72 * B * L * s * h**2 * (1 + s / (6 * h) + V / (12 * h * L))  # Korthikanti eq. 7
    assert est.model_tflops_per_gpu * 1e12 * est.step_time_s * 64 == pytest.approx(model_flops, rel=1e-3)
    assert est.bubble_fraction == pytest.approx(7 / (3 * 64))  # (p-1)/(v*m)
    assert est.hfu > est.mfu
    # Unsharded mixed-precision Adam: 2 + 4 + 12 bytes per parameter of a stage of 12 layers / tp 8.
    params = (12 * layer_params(GPT3) + V * h) / 8  # 12 layers and the embedding on the first stage
    states = est.memory["weights"] + est.memory["gradients"] + est.memory["optimizer"]
    assert states == pytest.approx(18 * params / 2**30)
    assert est.memory["total"] < 80


def test_chosen_175b_layout_on_1024_a100_is_close_to_the_published_one():
    """Megatron-LM trained GPT-3 175B on 1024 A100 with tp 8, pp 16, batch 1536 (its example
    script; Narayanan et al. 2021 sec. 5.1: 140 TFLOP/s per GPU)."""
    fixed = {"sharding": "none", "sequence_parallel": False, "recompute": "full"}  # the 2021 software
    req = build_request(GPT3, 1024, "a100-80gb", seq_len=2048, global_batch=1536, fixed=fixed, software=MEGATRON_2021)
    best = search(req, top=1)[0]
    published = search(build_request(GPT3, 1024, "a100-80gb", seq_len=2048, global_batch=1536,
                                     fixed={**fixed, "tp": 8, "pp": 16}, software=MEGATRON_2021), top=1)[0]
    assert best.layout.tp >= 4 and 64 <= best.layout.tp * best.layout.pp <= 128
    assert published.step_time_s <= 1.10 * best.step_time_s
    assert best.hardware_tflops_per_gpu == pytest.approx(140, rel=0.20)


def test_fully_fixed_layout_is_evaluated_alone():
    fixed = dict(tp=8, pp=8, dp=16, cp=1, microbatch=1, virtual_stages=3, sharding="keep_gathered", recompute="selective",
                 sequence_parallel=True, pp_schedule="interleaved1f1b", stage_layers=[4] * 24)
    req = build_request(GPT3, 1024, "a100-80gb", seq_len=2048, global_batch=1536, fixed=fixed)
    plans = search(req)
    expected = {**fixed, "dp_shard": 16, "stage_layers": tuple(fixed["stage_layers"])}
    del expected["dp"]
    assert len(plans) == 1 and plans[0].layout == Layout(**expected)


def test_search_ranks_by_step_time_and_respects_fixed_knobs():
    req = build_request(build_model("llama3-70b"), 256, "h100", seq_len=8192, global_batch=512, fixed={"tp": 8})
    plans = search(req, top=20)
    assert len(plans) > 3 and all(p.layout.tp == 8 for p in plans)
    times = [p.step_time_s for p in plans]
    assert times == sorted(times)
    assert all(p.memory_gib_per_gpu <= 79.6 for p in plans)
    assert 0.25 < plans[0].mfu < 0.65  # what large dense runs on H100 publish (Megatron-LM README: 41-49%)


def test_more_memory_or_sharding_is_chosen_only_when_needed():
    small = search(build_request(build_model("gpt2-124m"), 8, "h100", seq_len=1024, global_batch=64))[0]
    assert small.layout.tp == 1 and small.layout.pp == 1 and small.layout.recompute == "none"
    with pytest.raises(UserError, match=r"GiB more than"):
        search(build_request(build_model("llama3-405b"), 8, "h100", seq_len=8192, global_batch=16))


# ---- the command ---------------------------------------------------------------------------------


def run_cli(*args, env=None):
    code = "import sys; from supercluster.cli.main import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["gpt3-175b", "--gpus", "1024", "--tp", "8", "--pp", "8", "--dp", "8", "--cp", "1"], "not the 1024 GPUs"),
        (["gpt3-175b", "--gpus", "1024", "--tp", "5"], "does not divide the model's 96 attention heads"),
        (["llama3-8b", "--gpus", "48", "--pp", "3", "--stage-layers", "10,10,10"], "sums to 30 layers but the model has 32"),
        (["llama3-8b", "--gpus", "16", "--pp", "2", "--stage-layers", "16,16", "--virtual-stages", "2"], "lists 2 stages"),
        (["llama3-8b", "--gpus", "16", "--sharding", "optimizer"], "not something this training stack runs"),
        (["llama3-8b", "--gpus", "16", "--sharding", "ful"], "did you mean 'full'"),
        (["llama3-8b", "--gpus", "16", "--pp", "2", "--pp-schedule", "1f2b"], "did you mean '1f1b'"),
        (["llama3-8b", "--gpus", "16", "--pp", "2", "--pp-schedule", "gpipe", "--virtual-stages", "2"], "runs one stage per rank"),
        (["gpt3-175b", "--gpus", "1024", "--tp", "16"], "exceeds the 8 GPUs of one"),
        (["gpt3-175b", "--gpus", "1024", "--gpu", "h1000"], "did you mean 'h100'"),
        (["llama3-405b", "--gpus", "8", "--global-batch", "16"], "GiB more than"),
        (["gpt3-175b", "--gpus", "64", "--recompute", "some"], "--recompute must be one of"),
        (["--layers", "4", "--gpus", "8"], "--hidden, --heads"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(args, needle):
    proc = run_cli("plan", *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_json_plans_and_emitted_config(tmp_path):
    out = tmp_path / "plan.toml"
    proc = run_cli("plan", "llama3-8b", "--gpus", "16", "--gpu", "h200", "--seq-len", "4096", "--global-batch", "64",
                   "--json", "--emit-config", str(out), "--tokens", "1e9", "--price", "3")
    assert proc.returncode == 0, proc.stderr
    plans = json.loads(proc.stdout)["plans"]
    keys = {"tp", "pp", "dp", "cp", "microbatch", "virtual_stages", "sharding", "recompute", "step_time_s",
            "tokens_per_s_per_gpu", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu", "hfu",
            "memory_gib_per_gpu", "bubble_fraction"}
    assert plans and all(keys <= set(p) for p in plans)
    assert [p["step_time_s"] for p in plans] == sorted(p["step_time_s"] for p in plans)
    best = plans[0]
    assert best["tp"] * best["pp"] * best["dp"] * best["cp"] == 16
    assert best["train_cost"] == pytest.approx(best["train_days"] * 24 * 16 * 3)
    emitted = tomllib.loads(out.read_text())
    assert emitted["model"]["preset"] == "llama3-8b"
    assert emitted["train"]["micro_batch"] == best["microbatch"] and emitted["train"]["global_batch"] == 64
    assert emitted["parallel"]["tp"] == best["tp"] and emitted["parallel"]["pp"] == best["pp"]
    assert emitted["train"]["steps"] == round(1e9 / (64 * 4096))
    from supercluster.train.config import load_config

    cfg = load_config(out, [])  # the trainer reads every emitted key
    assert cfg.parallel.tp == best["tp"] and cfg.train.recompute == best["recompute"]


def test_plan_imports_no_torch_and_local_reads_the_cached_peak(tmp_path):
    from supercluster.hardware import local

    env = {**os.environ, "SUPERCLUSTER_HOME": str(tmp_path)}
    os.environ["SUPERCLUSTER_HOME"] = str(tmp_path)
    try:
        threads = max(1, (os.cpu_count() or 1) // 2)
        local.save_peak("fp32", 0.05, threads)  # a measured figure, as `local_peak` would have cached
        local.save_peak("mem_tbps", 0.01)
    finally:
        del os.environ["SUPERCLUSTER_HOME"]
    code = (
        "import sys, json; from supercluster.cli.main import main\n"
        "try: main(['plan', 'tiny', '--gpus', '2', '--gpu', 'local', '--global-batch', '8', '--json'])\n"
        "finally: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("NO-TORCH")
    best = json.loads(proc.stdout)["plans"][0]
    assert best["hardware_tflops_per_gpu"] < 0.05  # bounded by the cached local peak


def test_emitted_pipeline_config_passes_the_trainers_checks(tmp_path):
    """A GPT preset (tied embeddings, vocabulary 50257) on tp 2 x pp 2 interleaved: the emitted
    config must satisfy the trainer's own layout rules."""
    from supercluster.parallel.dims import ParallelDims
    from supercluster.parallel.layout import PP_SCHEDULES
    from supercluster.train.config import layout_of, load_config

    out = tmp_path / "pp.toml"
    proc = run_cli("plan", "gpt2-124m", "--gpus", "8", "--tp", "2", "--pp", "2", "--virtual-stages", "2",
                   "--seq-len", "1024", "--global-batch", "32", "--emit-config", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(out, [])
    assert cfg.parallel.pp_schedule in PP_SCHEDULES and cfg.parallel.pp_schedule != "1f1b"
    # Raises UserError on any mismatch with the trainer's rules.
    ParallelDims.of(layout_of(cfg, 8), 8, cfg.model_config(), cfg.train.seq_len, cfg.train.global_batch, 8)
