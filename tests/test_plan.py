"""The planner: accuracy on published runs, the paper formulas it is built from, the search,
and the `supercluster plan` command end to end (bad input exits 2 with one sentence)."""

import json
import os
import subprocess
import sys
import tomllib

import pytest
from dataclasses import replace

from supercluster.errors import UserError
from supercluster.model.config import ModelConfig, layer_params
from supercluster.plan import calibrate
from supercluster.plan.build import build_model, build_request
from supercluster.parallel.layout import Layout
from supercluster.plan import goodput
from supercluster.plan.cost import CONSTANTS_FILE, MEMORY_MARGIN, _activation_bytes_per_layer, estimate, load_constants
from supercluster.plan.profiles import PROFILES
from supercluster.plan.search import search

GPT = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True)
GPT3 = ModelConfig(layers=96, hidden=12288, heads=96, vocab_size=51200, max_seq_len=2048, **GPT)
MEGATRON_2021 = PROFILES["megatron-2021"]


# ---- accuracy against published runs ------------------------------------------------------------


@pytest.fixture(scope="module")
def rows():
    found, _ = calibrate.load_rows()  # the repository's own data: never skipped
    return found


@pytest.fixture(scope="module")
def loso(rows):
    return calibrate.leave_one_source_out(rows)


def test_every_left_out_source_is_predicted_within_its_bound(rows, loso):
    """Fitted on the other sources only, each source's dense runs (5 or more) are predicted
    within 12.5% MAPE (the goal is 8%: Megatron-Bridge's FP8 tables, 11.4%, and IBM's FSDP
    table, 10.5%, are the worst today; Together 8.2%, Korthikanti 7.8%, MosaicML 7.1%,
    torchtitan 5.5%); the small sources (MT-NLG, BLOOM, Llama 3's table) within 25%. MoE runs miss by
    far more today (Megatron-Bridge's 17: 39% since its Qwen3 rows carry their recipes' own
    layouts, no recompute, and FP8 experts pay their own input casts; DeepSeek-V3's own run:
    20% with its node-deduplicated FP8 dispatch; Together's four 512-GPU B200 runs: 27%, the
    MXFP8 ones 38% and 40% fast): held under 60% (DeepSeek-V3 under 25%) so that they cannot get
    worse unnoticed, and shown as wider intervals."""
    assert len(loso) >= 14
    for source, res in loso.items():
        test = [r for r in rows if r.source == source]
        dense = [abs(e) for r, e in zip(test, res["errors"]) if not calibrate._is_moe(r)]
        experts = [abs(e) for r, e in zip(test, res["errors"]) if calibrate._is_moe(r)]
        if dense:
            assert sum(dense) / len(dense) <= (0.125 if len(dense) >= 5 else 0.25), source
            assert max(dense) < 0.6, source
        if experts:
            assert sum(experts) / len(experts) <= (0.25 if source == "deepseek-v3-2024" else 0.6), source


def test_node_deduplicated_dispatch_sends_each_token_once_per_remote_node():
    """DeepSeek-V3 sec. 3.2.2: with group-limited routing a token reaches at most 4 of the 8
    nodes of an ep-64 group, and crosses the network once per node: half the bytes (or less)
    of one copy per expert; FP8 dispatch (sec. 3.3.2) trims the rest. On one node: no change."""
    from supercluster.hardware.catalog import accelerator, node_type
    from supercluster.plan import moe
    from supercluster.plan.cost import Rates, System

    cfg = build_model("deepseek-v3")
    assert moe.distinct_nodes(replace(cfg, moe_groups=8, moe_topk_groups=4), 8) == 4
    assert moe.distinct_nodes(replace(cfg, moe_groups=1, moe_topk_groups=1), 8) == pytest.approx(8 * (1 - (7 / 8) ** 8))
    system = System(accelerator("h800"), node_type("hgx-h800"), "fp8")
    r = Rates(system, PROFILES["megatron"], load_constants("megatron"))
    lay = Layout(tp=1, pp=1, dp_shard=64, ep=64)
    routed = replace(cfg, moe_groups=8, moe_topk_groups=4)
    plain, tier = moe.all_to_all_time(routed, lay, r, 4096, 1.0, PROFILES["megatron"])
    dedup, tier2 = moe.all_to_all_time(routed, lay, r, 4096, 1.0, replace(PROFILES["megatron"], ep_node_dedup=True))
    both, _ = moe.all_to_all_time(routed, lay, r, 4096, 1.0,
                                  replace(PROFILES["megatron"], ep_node_dedup=True, fp8_dispatch=True))
    assert dedup < 0.55 * plain and both < 0.8 * dedup and "node-deduplicated" in tier2 and "node" not in tier
    small = Layout(tp=1, pp=1, dp_shard=8, ep=8)
    assert moe.all_to_all_time(routed, small, r, 4096, 1.0, replace(PROFILES["megatron"], ep_node_dedup=True)) == \
        moe.all_to_all_time(routed, small, r, 4096, 1.0, PROFILES["megatron"])


def test_fp8_expert_gemms_quantize_their_own_inputs_even_where_casts_fuse():
    """Transformer Engine's GroupedLinear quantizes the permuted tokens and the activation
    output itself (tex.split_quantize) and caches its FP8 weights across microbatches: each
    expert input element pays the unfused cast, not the fused one LayerNormLinear gets. With
    FP8 dispatch the tokens are cast once, before the all-to-all, not once per copy."""
    from supercluster.hardware.catalog import accelerator, node_type
    from supercluster.plan import moe
    from supercluster.plan.cost import FP8_CAST_BYTES, FP8_FUSED_CAST_BYTES, Rates, System

    cfg = build_model("qwen3-30b-a3b")
    lay = Layout(tp=1, pp=1, dp_shard=8, ep=8)
    system = System(accelerator("b200"), node_type("dgx-b200"), "fp8")
    tokens, h, f, local = 4096, cfg.hidden, cfg.moe_hidden, cfg.moe_experts / 8
    copies = tokens * cfg.moe_top_k  # (token, expert) pairs a rank computes, balanced
    for recipe in ("tensorwise", "mxfp8"):
        sw = replace(PROFILES["megatron"], fp8_recipe=recipe)
        r = Rates(system, sw, load_constants("megatron"))
        own = moe.ffn_linear_time(cfg, lay, r, tokens, 1.0)
        # the same GEMMs with the fused cast a norm-fed linear gets
        fused = (r.gemm(tokens, h, cfg.moe_experts)
                 + r.gemm(copies / local, h, 2 * f, batch=local, linear=True, launches=local)
                 + r.gemm(copies / local, f, h, batch=local, linear=True, launches=local))
        extra = (FP8_CAST_BYTES[recipe] - FP8_FUSED_CAST_BYTES[recipe]) * copies * (h + f) / r.hbm
        assert own - fused == pytest.approx(extra, rel=1e-9)
        dispatched = moe.ffn_linear_time(cfg, lay, Rates(system, replace(sw, fp8_dispatch=True), load_constants("megatron")),
                                         tokens, 1.0)
        assert own - dispatched == pytest.approx(FP8_CAST_BYTES[recipe] * (copies - tokens) * h / r.hbm, rel=1e-9)
    # A stack that casts in its own kernels everywhere (torchao) is charged as before.
    r = Rates(system, PROFILES["supercluster"], load_constants("supercluster"))
    assert moe.ffn_linear_time(cfg, lay, r, tokens, 1.0) == pytest.approx(
        r.gemm(tokens, h, cfg.moe_experts) + r.gemm(copies / local, h, 2 * f, batch=local, linear=True, launches=local)
        + r.gemm(copies / local, f, h, batch=local, linear=True, launches=local), rel=1e-12)
    # bf16: no casts at all
    r16 = Rates(System(accelerator("b200"), node_type("dgx-b200"), "bf16"), PROFILES["megatron"], load_constants("megatron"))
    assert moe.ffn_linear_time(cfg, lay, r16, tokens, 1.0) == pytest.approx(
        r16.gemm(tokens, h, cfg.moe_experts) + r16.gemm(copies / local, h, 2 * f, batch=local, linear=True, launches=local)
        + r16.gemm(copies / local, f, h, batch=local, linear=True, launches=local), rel=1e-12)


def test_every_published_layout_is_answered_at_its_own_layout(rows):
    """A layout that ran in public is never refused: the planner, given every knob the source
    states, answers (over HBM by at most the memory model's margin, then with a warning)."""
    from supercluster.plan.search import Request

    for row in rows:
        plan = search(Request(row.work, row.system, row.gpu_count, row.software, dict(row.stated)), top=1)[0]
        for knob, value in row.stated.items():
            got = plan.layout.dp if knob == "dp" else getattr(plan.layout, knob)
            assert got == value, (row.label, knob)
        assert plan.memory_gib_per_gpu <= row.system.accelerator.hbm_gib * (1 + MEMORY_MARGIN), row.label


def test_memory_model_is_never_pessimistic_on_published_peaks(rows):
    """Where a source publishes its peak memory (torchtitan: PyTorch's peak reserved bytes),
    the prediction at that layout is not above it by more than the margin: a run that fit is
    never refused for memory."""
    # Judged at the published layout: rows whose recompute policy the source does not state
    # (Trainy's) choose one, so their memory says nothing about the model.
    peaks = [r for r in rows if r.peak_memory_gib and "recompute" in r.stated]
    assert len(peaks) >= 18
    constants = load_constants()
    for row in peaks:
        predicted = calibrate.best(row, constants[row.stack]).memory_gib_per_gpu
        assert predicted <= row.peak_memory_gib * (1 + MEMORY_MARGIN), row.label


def test_intervals_hold_about_their_share_of_left_out_runs(rows, loso):
    """Each source's runs, judged against intervals built from the other sources' left-out
    residuals only: about INTERVAL_COVERAGE of them fall inside."""
    from supercluster.plan.cost import INTERVAL_COVERAGE, load_intervals

    inside = total = 0
    for source in loso:
        others = {s: v for s, v in loso.items() if s != source}
        table = calibrate.intervals([r for r in rows if r.source != source], others)
        test = [r for r in rows if r.source == source]
        for row, ratio in zip(test, calibrate.step_ratios(test, loso[source]["errors"])):
            key = calibrate.interval_class(row.stack, row.system.precision, calibrate._is_moe(row))
            low, high = (table.get(key) or table["all"])["ratio"]
            inside += low <= ratio <= high
            total += 1
    assert INTERVAL_COVERAGE - 0.15 <= inside / total <= INTERVAL_COVERAGE + 0.12, inside / total
    stored = load_intervals()  # the checked-in table is the one these residuals give
    assert stored["all"]["ratio"] == pytest.approx(calibrate.intervals(rows, loso)["all"]["ratio"], abs=0.01)


# Who ran and measured each source: NVIDIA's Megatron lineage (its papers, READMEs and NeMo/Bridge
# tables, and MT-NLG on NVIDIA's Selene) counts as one organisation; Together AI ran NVIDIA's
# recipes on its own cluster, IBM its own stack and cluster.
ORGANISATIONS = {
    "narayanan2021": "NVIDIA", "korthikanti2022": "NVIDIA", "megatron-readme-2024": "NVIDIA",
    "megatron-bridge-2025": "NVIDIA", "nemo-2407": "NVIDIA", "mtnlg-2022": "NVIDIA",
    "torchtitan-2024": "Meta", "llama3-2024": "Meta", "bloom-2022": "BigScience", "deepseek-v3-2024": "DeepSeek",
    "trainy-2025": "Trainy", "mosaicml-2023": "MosaicML", "together-2026": "Together AI", "ibm-fsdp-2024": "IBM",
}


def test_calibration_rows_carry_their_layout_in_columns(rows):
    assert len(rows) >= 170 and len({r.source for r in rows}) >= 14
    assert len({ORGANISATIONS[r.source] for r in rows}) >= 8  # independent measurers, not only NVIDIA's tables
    assert sum(calibrate._is_moe(r) for r in rows) >= 18
    gpus = {r.system.accelerator.name for r in rows}
    assert {"a100-80gb", "h100", "b200", "gb200"} <= gpus
    for gpu in ("a100-80gb", "h100", "b200"):  # each generation measured by more than one organisation
        assert len({ORGANISATIONS[r.source] for r in rows if r.system.accelerator.name == gpu}) >= 2, gpu
    korthikanti_baselines = [r for r in rows if r.source == "korthikanti2022" and r.metric == "step_time_s"]
    assert len(korthikanti_baselines) == 4
    assert all(r.stated["sequence_parallel"] is False and r.stated["recompute"] == "full" for r in korthikanti_baselines)
    interleaved = [r for r in rows if r.stated.get("virtual_stages") == 3]
    assert len(interleaved) >= 6
    assert {r.stack for r in rows} == {"megatron", "megatron-2021", "deepspeed", "supercluster"}


def test_constants_are_few_per_profile_and_reproducible(rows):
    stored = json.loads(CONSTANTS_FILE.read_text())["constants"]
    assert set(stored) == set(PROFILES)
    assert all(len(c) <= 2 for c in stored.values())
    refit = calibrate.fit(rows)
    for stack, consts in refit.items():
        for key, value in consts.items():
            assert value == pytest.approx(stored[stack][key], abs=0.01)


# ---- the paper formulas --------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 8])
def test_activation_memory_is_korthikanti_table_2(t):
    s, b, h, a = 2048, 2, GPT3.hidden, GPT3.heads
    sbh = s * b * h

    def act(recompute, sp):
        return _activation_bytes_per_layer(GPT3, Layout(tp=t, microbatch=b, recompute=recompute, sequence_parallel=sp), MEGATRON_2021, s)

    assert act("none", False) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))  # eq. 2
    assert act("none", True) == pytest.approx(sbh / t * (34 + 5 * a * s / h))  # eq. 4
    # Megatron's selective recompute drops the attention core (Table 2: 10 + 24/t, 34/t with SP).
    assert act("selective", False) == pytest.approx(sbh * (10 + 24 / t))
    assert act("selective", True) == pytest.approx(34 * sbh / t)
    assert act("full", False) == pytest.approx(2 * sbh)
    # The trainer's selective policy instead drops norm outputs, dropout masks and the GELU
    # output (4 + 2 replicated bytes, 8 split) and keeps the attention scores' inputs.
    mine = replace(MEGATRON_2021, selective="elementwise")
    ours = _activation_bytes_per_layer(GPT3, Layout(tp=t, microbatch=b, recompute="selective", sequence_parallel=False), mine, s)
    assert ours == pytest.approx(sbh * (4 + (16 + 5 * a * s / h) / t))


def test_flops_bubble_and_memory_of_one_layout():
    req = build_request(GPT3, 64, "a100-80gb", seq_len=2048, global_batch=64, software=MEGATRON_2021)
    lay = Layout(tp=8, pp=8, microbatch=1, virtual_stages=3, pp_schedule="interleaved1f1b", sharding="none",
                 recompute="selective", sequence_parallel=True)
    est = estimate(req.work, lay, req.system, req.software)
    B, L, s, h, V = 64, 96, 2048, 12288, 51200
    model_flops = 72 * B * L * s * h**2 * (1 + s / (6 * h) + V / (12 * h * L))  # Korthikanti eq. 7
    assert est.model_tflops_per_gpu * 1e12 * est.step_time_s * 64 == pytest.approx(model_flops, rel=1e-3)
    assert est.bubble_fraction == pytest.approx(7 / (3 * 64))  # (p-1)/(v*m)
    assert est.stack == "megatron-2021"
    # ZeRO-0 mixed-precision Adam: 2 + 4 + 12 bytes per parameter of a stage of 12 layers / tp 8.
    params = (12 * layer_params(GPT3) + V * h) / 8  # 12 layers and the embedding on the first stage
    states = est.memory["weights"] + est.memory["gradients"] + est.memory["optimizer"]
    assert states == pytest.approx(18 * params / 2**30)
    kept = replace(lay, recompute="none")
    unfused = estimate(req.work, kept, req.system, req.software)
    flash = estimate(req.work, kept, req.system, PROFILES["megatron"])
    assert unfused.memory["activations"] > flash.memory["activations"]  # unfused attention keeps its scores
    # ... which Megatron's selective recompute drops, rebuilding the attention core (a GEMM: HFU > MFU).
    assert est.memory["activations"] == pytest.approx(flash.memory["activations"])
    # One more attention forward (4*s*h FLOPs per token and layer) over eq. 7's model FLOPs per token.
    assert est.hfu / est.mfu == pytest.approx(1 + 4 * L * s * h / (72 * L * h**2 * (1 + s / (6 * h) + V / (12 * h * L))))


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
    fixed = dict(tp=8, pp=8, dp=16, cp=1, microbatch=1, virtual_stages=3, sharding="optimizer", recompute="selective",
                 sequence_parallel=True, pp_schedule="interleaved1f1b")
    req = build_request(GPT3, 1024, "a100-80gb", seq_len=2048, global_batch=1536, fixed=fixed, software=PROFILES["megatron"])
    plans = search(req)
    expected = {**fixed, "dp_shard": 16}
    del expected["dp"]
    assert len(plans) == 1 and plans[0].layout == Layout(**expected) and plans[0].stack == "megatron"


def test_search_ranks_by_step_time_and_respects_fixed_knobs():
    req = build_request(build_model("llama3-70b"), 256, "h100", seq_len=8192, global_batch=512, fixed={"tp": 8})
    plans = search(req, top=20)
    assert len(plans) > 3 and all(p.layout.tp == 8 for p in plans)
    times = [p.step_time_s for p in plans]
    assert times == sorted(times)
    assert all(p.memory_gib_per_gpu <= 79.6 for p in plans)
    # MFU counts the model's FLOPs only, the same for every layout of one step: so it is inverse to
    # step time (the fastest plan has the highest); full recomputation repeats the forward pass and
    # shows in HFU, never in MFU (selective recompute repeats elementwise work only, no FLOPs).
    work = [p.mfu * p.step_time_s for p in plans]
    assert max(work) == pytest.approx(min(work), rel=1e-9) and plans[0].mfu == max(p.mfu for p in plans)
    assert all((p.hfu > p.mfu * 1.001) == (p.layout.recompute == "full") for p in plans)


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
        (["llama3-8b", "--gpus", "16", "--sharding", "optimizer"], "not run by the supercluster stack"),
        (["llama3-8b", "--gpus", "16", "--sharding", "ful"], "did you mean 'full'"),
        (["llama3-8b", "--gpus", "16", "--pp", "2", "--pp-schedule", "1f2b"], "did you mean '1f1b'"),
        (["llama3-8b", "--gpus", "16", "--pp", "2", "--pp-schedule", "gpipe", "--virtual-stages", "2"], "runs one stage per rank"),
        (["gpt3-175b", "--gpus", "1024", "--tp", "16"], "exceeds the 8 GPUs of one"),
        (["gpt3-175b", "--gpus", "1024", "--gpu", "h1000"], "did you mean 'h100'"),
        (["llama3-405b", "--gpus", "8", "--global-batch", "16"], "GiB more than"),
        (["gpt3-175b", "--gpus", "64", "--recompute", "some"], "--recompute must be one of"),
        (["--layers", "4", "--gpus", "8"], "--hidden, --heads"),
        (["gpt3-175b", "--gpus", "64", "--stack", "titan"], "Unknown stack 'titan'"),
        (["gpt3-175b", "--gpus", "64", "--sharding", "optimizer"], "not run by the supercluster stack"),
        (["llama3-8b", "--gpus", "16", "--precision", "fp8", "--fp8-recipe", "mxfp8"], "needs block-scaled FP8"),
        (["llama3-8b", "--gpus", "16", "--precision", "fp8", "--fp8-recipe", "rowwize"], "did you mean 'rowwise'"),
        (["llama3-8b", "--gpus", "16", "--fp8-all-gather"], "add --precision fp8"),
        (["llama3-8b", "--gpus", "16", "--moe-imbalance", "1.2", "--ep-overlap"],
         "--moe-imbalance, --ep-overlap apply to Mixture-of-Experts models; 'llama3-8b' is dense"),
        (["--layers", "4", "--hidden", "256", "--heads", "4", "--gpus", "8", "--fp8-dispatch"], "the model given is dense"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(args, needle):
    proc = run_cli("plan", *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["llama3-405b", "--gpus", "16384", "--gpu", "h100", "--tokens", "15e12", "--price", "2.5"],
    ["gpt3-175b", "--gpus", "1024", "--gpu", "a100-80gb", "--global-batch", "1536", "--tokens", "3e11", "--price", "2"],
])
def test_the_table_fits_100_columns_and_wide_shows_every_column(args):
    proc = run_cli("plan", *args, "--top", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 100 and "…" not in proc.stdout  # nothing cut
    rows = [line for line in lines if line.lstrip().startswith("tp")]
    assert len(rows) == 5  # one line per layout
    assert all(len(row.split()) >= 13 for row in rows)  # every value of the row on it
    def header(text):
        return next(line.split() for line in text.splitlines() if line.lstrip().startswith("layout"))

    wide = run_cli("plan", *args, "--top", "5", "--wide").stdout
    assert {"HFU", "TF"} <= set(header(wide)) and "HFU" not in header(proc.stdout) and "…" not in wide


def test_json_plans_and_emitted_config(tmp_path):
    out = tmp_path / "plan.toml"
    proc = run_cli("plan", "llama3-8b", "--gpus", "16", "--gpu", "h200", "--seq-len", "4096", "--global-batch", "64",
                   "--json", "--emit-config", str(out), "--tokens", "1e9", "--price", "3")
    assert proc.returncode == 0, proc.stderr
    plans = json.loads(proc.stdout)["plans"]
    assert json.loads(proc.stdout)["stack"] == "supercluster"
    keys = {"tp", "pp", "dp", "cp", "microbatch", "virtual_stages", "sharding", "recompute", "step_time_s", "stack",
            "effective_training_fraction", "checkpoint_every_steps", "train_days_without_failures",
            "tokens_per_s_per_gpu", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu", "hfu",
            "memory_gib_per_gpu", "bubble_fraction"}
    assert plans and all(keys <= set(p) for p in plans)
    for p in plans:  # every prediction carries its range, around it
        assert p["step_time_s_low"] < p["step_time_s"] < p["step_time_s_high"]
        assert p["mfu_low"] < p["mfu"] < p["mfu_high"]
        assert p["mfu_low"] * p["step_time_s_high"] == pytest.approx(p["mfu"] * p["step_time_s"])
    assert [p["step_time_s"] for p in plans] == sorted(p["step_time_s"] for p in plans)
    best = plans[0]
    assert best["tp"] * best["pp"] * best["dp"] * best["cp"] == 16
    assert best["train_cost"] == pytest.approx(best["train_days"] * 24 * 16 * 3)
    assert best["train_days"] > best["train_days_without_failures"]
    assert emitted_checkpoint(out) == best["checkpoint_every_steps"]
    emitted = tomllib.loads(out.read_text())
    assert emitted["model"]["preset"] == "llama3-8b"
    assert emitted["train"]["micro_batch"] == best["microbatch"] and emitted["train"]["global_batch"] == 64
    assert emitted["parallel"]["tp"] == best["tp"] and emitted["parallel"]["pp"] == best["pp"]
    assert emitted["train"]["steps"] == round(1e9 / (64 * 4096))
    from supercluster.train.config import load_config

    cfg = load_config(out, [])  # the trainer reads every emitted key
    assert cfg.parallel.tp == best["tp"] and cfg.train.recompute == best["recompute"]


def test_plan_imports_no_torch_and_local_reads_the_cached_peak(tmp_path, monkeypatch):
    from supercluster.hardware import local

    env = {**os.environ, "SUPERCLUSTER_HOME": str(tmp_path)}
    with monkeypatch.context() as patch:  # the session's own home comes back afterwards
        patch.setenv("SUPERCLUSTER_HOME", str(tmp_path))
        threads = max(1, (os.cpu_count() or 1) // 2)
        local.save_peak("fp32", 0.05, threads)  # a measured figure, as `local_peak` would have cached
        local.save_peak("mem_tbps", 0.01)
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


def emitted_checkpoint(path):
    return tomllib.loads(path.read_text())["train"]["checkpoint_every"]


# ---- failures and goodput --------------------------------------------------------------------------


def test_young_and_daly_intervals_by_hand():
    # delta = 60 s, M = 3 h = 10800 s: Young sqrt(2*60*10800) = 1138.4 s; Daly with
    # x = 60/21600: 1138.4 * (1 + sqrt(x)/3 + x/9) - 60 = 1098.6 s.
    assert goodput.young_interval(60, 10800) == pytest.approx(1138.42, abs=0.01)
    assert goodput.daly_interval(60, 10800) == pytest.approx(1138.42 * (1 + (60 / 21600) ** 0.5 / 3 + 60 / 21600 / 9) - 60, rel=1e-6)
    assert goodput.daly_interval(100, 40) == 40  # write time beyond 2M: checkpoint every M
    # Daly's wall time, by hand: M e^(R/M) (e^((tau+delta)/M) - 1) T / tau.
    import math

    wall = goodput.wall_time(1e6, 1000, 60, 600, 10800)
    assert wall == pytest.approx(10800 * math.exp(600 / 10800) * (math.exp(1060 / 10800) - 1) * 1e6 / 1000)
    assert goodput.checkpoint_every_steps(1000, 7.0) == 143


def test_llama3_run_keeps_over_90_percent_effective_training_time():
    """Meta reports >90% effective training time for Llama 3 405B on 16,384 H100s with 419
    interruptions in 54 days; the model predicts about as many failures and over 90%."""
    g = goodput.goodput(16384, 0.9 * 54 * 86400, 405e9)
    assert g.mtbf_hours == pytest.approx(54 * 24 / 419, rel=1e-9)
    assert 0.90 < g.effective_fraction < 0.97
    assert g.failures_expected == pytest.approx(419, rel=0.1)
    worse = goodput.goodput(16384, 0.9 * 54 * 86400, 405e9, restart_s=3600)
    assert worse.effective_fraction < g.effective_fraction - 0.1


# ---- the trainer's layout, charged as the trainer runs it ------------------------------------------


LLAMA8B = build_model("llama3-8b")


def _one(lay, stack="supercluster", precision="bf16", gpus=None, batch=64, model=LLAMA8B):
    req = build_request(model, gpus or lay.gpus, "h100", seq_len=4096, global_batch=batch, precision=precision,
                        software=PROFILES[stack] if isinstance(stack, str) else stack)
    return estimate(req.work, lay, req.system, req.software)


def test_full_sharding_gathers_per_microbatch_and_keep_gathered_once_per_step():
    """Without overlap (DeepSpeed's profile, its ZeRO-3 reduction overlap off) the exposed
    data-parallel time is the collectives themselves: "full" all-gathers 2 per microbatch,
    "keep_gathered" once per step."""
    serial = replace(PROFILES["deepspeed"], overlap_zero3_reduce=False)
    base = Layout(dp_shard=16, microbatch=1, recompute="full")  # 64/16 = 4 microbatches
    kept = _one(replace(base, sharding="keep_gathered"), serial)
    full = _one(replace(base, sharding="full"), serial)
    none = _one(replace(base, sharding="none"), serial)
    # reduce-scatter R + gather G once vs R + 8 G: the difference is 7 gathers.
    gather = (full.exposed_comm_s - kept.exposed_comm_s) / 7
    assert gather > 0
    assert kept.exposed_comm_s == pytest.approx(none.exposed_comm_s / 2 + gather, rel=0.05)  # all-reduce = 2 R
    assert kept.memory["weights"] > full.memory["weights"] * 8  # kept gathered: the whole model resident


def test_uneven_stages_are_paced_by_the_busiest():
    even = Layout(tp=8, pp=8, dp_shard=2, sharding="keep_gathered", microbatch=1, recompute="full")
    llama405 = build_model("llama3-405b")
    # 126 layers on 8 stages: as even as possible (16 x 6 + 15 x 2) or lighter ends, as Llama 3
    # did for the embedding and the output layer.
    auto = _one(even, model=llama405, batch=128)
    lighter_ends = _one(replace(even, stage_layers=(15, 16, 16, 16, 16, 16, 16, 15)), model=llama405, batch=128)
    lopsided = _one(replace(even, stage_layers=(9, 16, 16, 16, 16, 16, 16, 21)), model=llama405, batch=128)
    assert lopsided.step_time_s > 1.2 * auto.step_time_s  # 21 layers set the pace
    assert lighter_ends.step_time_s < auto.step_time_s  # the embedding is no longer on top of 16 layers


def test_fp8_runs_linear_layers_at_the_fp8_rate_and_reports_mfu_against_bf16():
    lay = Layout(dp_shard=8, sharding="full", microbatch=2, recompute="selective")
    bf16, fp8 = _one(lay, batch=16), _one(lay, precision="fp8", batch=16)
    speedup = bf16.step_time_s / fp8.step_time_s
    assert 1.2 < speedup < 2.0  # GEMMs 2x at most; attention, norms, loss stay 16-bit
    assert fp8.mfu == pytest.approx(bf16.mfu * speedup, rel=1e-6)  # same model FLOPs, same bf16 peak


def test_selective_recompute_repeats_elementwise_ops_only():
    lay = Layout(dp_shard=8, sharding="full", microbatch=2)
    none, sel, full = (_one(replace(lay, recompute=r), batch=16) for r in ("none", "selective", "full"))
    assert none.step_time_s < sel.step_time_s < 1.05 * none.step_time_s  # a memory-bound pass, a few %
    assert full.step_time_s > 1.2 * none.step_time_s  # the whole forward again
    assert sel.memory["activations"] < none.memory["activations"]
    assert sel.hfu == sel.mfu and full.hfu > full.mfu


def test_sequence_parallelism_only_when_the_layout_says_so():
    on = Layout(tp=8, dp_shard=2, sharding="full", microbatch=1, recompute="none", sequence_parallel=True)
    off = replace(on, sequence_parallel=False)
    assert _one(on, batch=16).memory["activations"] < _one(off, batch=16).memory["activations"]


def test_memory_model_matches_torchtitans_fsdp_runs(rows):
    """Nothing in the memory model is fitted: torchtitan's 8B FSDP runs (the published layout,
    selective recompute) report 62-82 GiB peaks, predicted within 10%. Its pipeline and
    long-context runs are not: the model leaves out allocator slack and pipeline buffers there."""
    fsdp = [r for r in rows if r.source == "torchtitan-2024" and r.stated.get("recompute") == "selective"]
    assert len(fsdp) == 6
    for row in fsdp:
        predicted = calibrate.best(row, load_constants("supercluster")).memory_gib_per_gpu
        assert predicted == pytest.approx(row.peak_memory_gib, rel=0.10), row.label


# ---- switches and the step's terms -----------------------------------------------------------------


def test_switches_change_what_their_mechanism_touches():
    from supercluster.plan.profiles import with_switches

    lay = Layout(tp=8, dp_shard=4, sharding="full", microbatch=1, recompute="full", sequence_parallel=True)
    model, base = build_model("llama3-70b"), PROFILES["supercluster"]

    def run(sw, precision="bf16", gpu="h100"):
        req = build_request(model, 32, gpu, seq_len=8192, global_batch=32, precision=precision, software=sw)
        return estimate(req.work, lay, req.system, req.software)

    eager, compiled = run(with_switches(base, compile=False)), run(with_switches(base, compile=True))
    assert eager.terms["compute: elementwise (norms, activations, residuals)"] > 2 * compiled.terms[
        "compute: elementwise (norms, activations, residuals)"]
    assert eager.terms["compute: linear GEMMs"] == pytest.approx(compiled.terms["compute: linear GEMMs"])
    sync, overlapped = run(with_switches(base, async_tp=False)), run(with_switches(base, async_tp=True))
    tp = "comm: tp all-gather/reduce-scatter (scale-up), exposed"
    assert sync.terms[tp] > 0 and overlapped.terms[tp] < sync.terms[tp]
    assert overlapped.step_time_s < sync.step_time_s
    recipes = [run(with_switches(base, fp8_recipe=r), "fp8", "b200").step_time_s for r in ("tensorwise", "rowwise", "mxfp8")]
    assert recipes[0] < recipes[1] < recipes[2] < run(base, "bf16", "b200").step_time_s  # more cast traffic, still FP8 GEMMs
    exposed = replace(base, overlap_dp=False)  # with overlap the gather hides behind compute either way
    gathered = run(with_switches(exposed, fp8_all_gather=True), "fp8")
    plain = run(exposed, "fp8")
    gather = "comm: dp weight all-gather (scale-up + scale-out), exposed"
    assert 0 < gathered.terms[gather] < 0.75 * plain.terms[gather]  # one byte a weight instead of two


def test_fp8_tensor_parallel_all_gathers_move_one_byte_under_tensorwise_scaling():
    # torchao's Float8ColwiseParallel / Float8RowwiseParallel (torchtitan with Float8 and TP):
    # the sequence-parallel all-gathers move FP8, the reduce-scatters 16-bit: 3/4 of the bytes.
    # torchtitan keeps 16-bit TP for the rowwise recipe, and without FP8 nothing changes.
    from supercluster.plan.profiles import with_switches

    lay = Layout(tp=8, dp_shard=4, sharding="full", microbatch=1, recompute="full", sequence_parallel=True)
    model, base = build_model("llama3-70b"), PROFILES["supercluster"]
    assert base.fp8_tp_all_gather and not PROFILES["megatron"].fp8_tp_all_gather

    def tp(sw, precision="fp8"):
        req = build_request(model, 32, "h100", seq_len=8192, global_batch=32, precision=precision, software=sw)
        return estimate(req.work, lay, req.system, req.software).terms["comm: tp all-gather/reduce-scatter (scale-up), exposed"]

    from supercluster.plan.cost import COLLECTIVE_LATENCY_S

    plain = replace(base, fp8_tp_all_gather=False)
    # 8 microbatches x 80 layers x 6 rounds (4, and 2 more for the full recompute) x 2 passes
    latency = 8 * 80 * 6 * 2 * COLLECTIVE_LATENCY_S
    assert tp(base) - latency == pytest.approx(0.75 * (tp(plain) - latency), rel=1e-9)
    rowwise = with_switches(base, fp8_recipe="rowwise")
    assert tp(rowwise) == pytest.approx(tp(replace(rowwise, fp8_tp_all_gather=False)), rel=1e-12)
    assert tp(base, "bf16") == pytest.approx(tp(plain, "bf16"), rel=1e-12)


def test_explain_terms_add_up_to_the_step():
    req = build_request(build_model("llama3-405b"), 2048, "h100", seq_len=8192, global_batch=1024)
    for est in search(req, top=5):
        assert sum(est.terms.values()) == pytest.approx(est.step_time_s, rel=1e-9)
        assert sum(v for k, v in est.terms.items() if k.startswith("compute")) == pytest.approx(
            est.compute_s, rel=1e-9)
    proc = run_cli("plan", "llama3-8b", "--gpus", "16", "--explain", "--top", "2")
    assert proc.returncode == 0, proc.stderr
    assert "compute: linear GEMMs" in proc.stdout and "they add up to" in proc.stdout
    assert max(map(len, proc.stdout.splitlines())) <= 100
    # the part the prediction rests on, from the catalog (a variant's power cap and HBM included)
    assert "GPU: h100: 989 TFLOP/s bf16 peak (792 measured best), 80 GiB HBM at 3.35 TB/s, 700 W, NVLink 4" in \
        " ".join(proc.stdout.split())


# ---- Mixture of Experts ----------------------------------------------------------------------------


def _moe(lay, model="qwen3-30b-a3b", gpus=None, imbalance=1.0, stack="megatron", gpu="h100", batch=64):
    from supercluster.model.config import flops_per_token

    cfg = build_model(model)
    req = build_request(cfg, gpus or lay.gpus, gpu, seq_len=4096, global_batch=batch, software=PROFILES[stack],
                        moe_imbalance=imbalance)
    est = estimate(req.work, lay, req.system, req.software)
    return est, flops_per_token(cfg, 4096) * batch * 4096


def test_moe_flops_follow_the_active_experts_and_memory_all_experts():
    lay = Layout(dp_shard=8, ep=1, sharding="optimizer", microbatch=1, recompute="full")
    est, active_flops = _moe(lay)
    assert est.model_tflops_per_gpu * 1e12 * est.step_time_s * 8 == pytest.approx(active_flops, rel=1e-6)
    sharded = _moe(replace(lay, ep=8))[0]
    # Unsharded weights (the distributed optimizer shards only its state): every expert on
    # every rank at ep 1, an eighth of them at ep 8; the dense part is the same.
    cfg = build_model("qwen3-30b-a3b")
    experts = cfg.moe_layers * cfg.moe_experts * 3 * cfg.hidden * cfg.moe_hidden * 2 / 2**30  # bf16 GiB
    assert est.memory["weights"] - sharded.memory["weights"] == pytest.approx(experts * 7 / 8, rel=1e-6)
    # Full sharding with ep folded in: each expert on 1/ep of the ranks, FSDP over the rest,
    # so every parameter is spread once over all 16 ranks.
    from supercluster.model.config import num_params

    full = _moe(Layout(dp_shard=16, ep=8, sharding="full", microbatch=1, recompute="full"), batch=64)[0]
    assert full.memory["weights"] == pytest.approx(2 * num_params(cfg) / 16 / 2**30, rel=1e-3)


def test_moe_all_to_all_is_priced_on_the_tier_it_crosses_and_grows_with_imbalance():
    inside = _moe(Layout(dp_shard=16, ep=8, sharding="optimizer", microbatch=1, recompute="full"))[0]
    across = _moe(Layout(dp_shard=16, ep=16, sharding="optimizer", microbatch=1, recompute="full"))[0]
    a2a_in = [v for k, v in inside.terms.items() if k.startswith("comm: ep all-to-all")]
    assert any("(scale-up)" in k and v > 0 for k, v in inside.terms.items())
    assert any("scale-out" in k and v > 0 for k, v in across.terms.items() if k.startswith("comm: ep"))
    a2a_out = [v for k, v in across.terms.items() if k.startswith("comm: ep all-to-all")]
    assert sum(a2a_out) > 3 * sum(a2a_in)  # the NIC, not NVLink, carries most of it
    skewed = _moe(Layout(dp_shard=16, ep=8, sharding="optimizer", microbatch=1, recompute="full"), imbalance=1.5)[0]
    assert skewed.step_time_s > inside.step_time_s * 1.05
    assert sum(v for k, v in skewed.terms.items() if k.startswith("comm: ep")) == pytest.approx(1.5 * sum(a2a_in), rel=0.05)  # + latency


def test_plan_searches_ep_for_moe_models_and_says_how_mla_is_costed():
    proc = run_cli("plan", "deepseek-v3", "--gpus", "256", "--gpu", "b200", "--seq-len", "4096", "--global-batch",
                   "1024", "--stack", "megatron", "--precision", "fp8", "--top", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert any(p["ep"] > 1 for p in out["plans"])  # the experts do not fit unless spread
    assert any("multi-head latent attention" in n for n in out["notes"])
    assert all(p["interval_class"] == "megatron/fp8/moe" for p in out["plans"])  # MoE's own, wider range
    fixed = run_cli("plan", "deepseek-v3", "--gpus", "256", "--gpu", "b200", "--seq-len", "4096", "--global-batch",
                    "1024", "--stack", "megatron", "--ep", "32", "--top", "2", "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert all(p["ep"] == 32 for p in json.loads(fixed.stdout)["plans"])
    bad = run_cli("plan", "deepseek-v3", "--gpus", "256", "--ep", "3")
    assert bad.returncode == 2 and "does not divide the model's 256 experts" in bad.stderr


def test_grouped_expert_gemms_are_charged_one_launch_per_local_expert():
    # Transformer Engine's grouped GEMM is a host loop of one cuBLAS GEMM per expert
    # (nvte_multi_stream_cublas_gemm): the launches grow with the experts a rank holds, so
    # fewer, fuller ranks (small ep) pay more of them per token than the FLOPs alone say.
    from supercluster.plan import moe
    from supercluster.plan.cost import KERNEL_LAUNCH_S, Rates, System
    from supercluster.hardware.catalog import accelerator, node_type

    cfg = build_model("qwen3-30b-a3b")
    system = System(accelerator("b200"), node_type("dgx-b200"), "fp8")
    consts = load_constants("megatron")
    tokens = 4096
    for ep in (8, 2):
        lay = Layout(dp_shard=8, ep=ep, sharding="optimizer", microbatch=1)
        charged = Rates(system, PROFILES["megatron"], consts)
        free = Rates(system, PROFILES["megatron"], consts)
        free.launch = 0.0
        launches = (moe.ffn_linear_time(cfg, lay, charged, tokens, 1.0)
                    - moe.ffn_linear_time(cfg, lay, free, tokens, 1.0)) / KERNEL_LAUNCH_S
        local = cfg.moe_experts // ep
        assert launches == pytest.approx(1 + 2 * local)  # the router, then gate/up and down per expert


def _llama70b_fsdp(software, gpu="gb200", precision="fp8", recompute="none"):
    cfg = build_model("llama3-70b")
    req = build_request(cfg, 64, gpu, seq_len=8192, global_batch=128, precision=precision, software=software)
    lay = Layout(dp_shard=64, sharding="full", microbatch=2, recompute=recompute)
    return cfg, req, lay, estimate(req.work, lay, req.system, req.software)


def test_activation_offload_trades_hbm_for_host_link_time():
    # Megatron-Core's cpu_offloading_num_layers: the offloaded layers' saved activations leave
    # HBM; their copies ride the host link under the other layers' compute and show only when
    # the link is too slow for them.
    from supercluster.plan.cost import _activation_bytes_per_layer
    from supercluster.plan.profiles import with_switches

    base = PROFILES["megatron"]
    cfg, req, lay, plain = _llama70b_fsdp(base)
    _, _, _, offloaded = _llama70b_fsdp(with_switches(base, offload_layers=40))
    layer_gib = _activation_bytes_per_layer(cfg, lay, base, 8192, fp8=True) / 2**30
    assert plain.memory["activations"] - offloaded.memory["activations"] == pytest.approx(39 * layer_gib, rel=1e-6)
    assert offloaded.terms["comm: activation offload to host memory, exposed"] == 0.0  # NVLink-C2C keeps up
    slow = replace(req.system, node=replace(req.system.node, host_link_gbps=1.0))  # a 1 GB/s link cannot
    est = estimate(req.work, lay, slow, with_switches(base, offload_layers=40))
    exposed = est.terms["comm: activation offload to host memory, exposed"]
    assert exposed > 0 and est.step_time_s == pytest.approx(offloaded.step_time_s + exposed, rel=1e-6)
    with pytest.raises(UserError):
        with_switches(base, offload_layers=-1)


def test_fp8_stacks_that_fuse_casts_keep_fp8_copies_of_gemm_inputs_for_the_backward():
    # Transformer Engine saves the FP8 copies of the norm outputs, attention output and MLP
    # activation output for the weight-gradient GEMMs: a byte each, not two.
    from supercluster.plan.cost import _activation_bytes_per_layer

    cfg = build_model("llama3-70b")
    lay = Layout(dp_shard=64, sharding="full", microbatch=1, recompute="none")
    h, f, q = cfg.hidden, cfg.ffn_hidden, cfg.heads * cfg.head_dim
    sbh = 8192 * h
    wide = _activation_bytes_per_layer(cfg, lay, PROFILES["megatron"], 8192)
    narrow = _activation_bytes_per_layer(cfg, lay, PROFILES["megatron"], 8192, fp8=True)
    assert wide - narrow == pytest.approx(sbh * (2 + q / h + f / h), rel=1e-9)
    # torchao's Float8Linear casts in its own kernels (fp8_cast_fused off): nothing changes.
    assert _activation_bytes_per_layer(cfg, lay, PROFILES["supercluster"], 8192, fp8=True) == pytest.approx(
        _activation_bytes_per_layer(cfg, lay, PROFILES["supercluster"], 8192))


def test_hidden_data_parallel_collectives_slow_the_compute_beside_them():
    # Lee et al. 2025: compute overlapped with collectives runs 18.9% slower on average; a
    # collective of T seconds hidden under compute costs T * 0.189 / 1.189.
    from supercluster.plan import cost

    base = PROFILES["megatron"]
    cfg, req, lay, est = _llama70b_fsdp(base, gpu="b200")  # FSDP over 8 nodes: seconds of collectives
    dp = sum(v for k, v in est.terms.items() if k.startswith("comm: dp"))
    assert dp > 0
    saved = cost.OVERLAP_SLOWDOWN
    try:
        cost.OVERLAP_SLOWDOWN = 0.0
        free = estimate(req.work, lay, req.system, req.software)
    finally:
        cost.OVERLAP_SLOWDOWN = saved
    assert sum(v for k, v in free.terms.items() if k.startswith("comm: dp")) == 0.0  # all of it hidden
    assert est.step_time_s - free.step_time_s == pytest.approx(dp, rel=1e-9)
    # 0.159 of the seconds of collectives hidden under about four seconds of compute
    assert 0.05 < dp / est.step_time_s < 0.159


def test_bf16_gradient_reduction_halves_the_reduce_bytes():
    # FSDP's MixedPrecision(reduce_dtype=torch.bfloat16) (IBM's fms-fsdp): 2 bytes a gradient.
    from supercluster.plan.profiles import with_switches

    cfg = build_model("llama3-70b")
    req = build_request(cfg, 128, "a100-80gb", node="ibm-a100-400g", seq_len=4096, global_batch=256,
                        software=PROFILES["supercluster"])
    lay = Layout(dp_shard=128, sharding="none", microbatch=2, recompute="full")
    serial = replace(PROFILES["supercluster"], overlap_dp=False)  # the whole reduction exposed
    wide = estimate(req.work, lay, req.system, serial)
    narrow = estimate(req.work, lay, req.system, with_switches(serial, grad_reduce_bytes=2))
    key = next(k for k in wide.terms if k.startswith("comm: dp gradient"))
    assert narrow.terms[key] == pytest.approx(wide.terms[key] / 2, rel=0.01)  # less a few latencies
    with pytest.raises(UserError):
        with_switches(PROFILES["supercluster"], grad_reduce_bytes=3)


def test_plan_takes_cpu_offload_layers():
    args = ["plan", "llama3-70b", "--gpus", "64", "--gpu", "gb200", "--stack", "megatron", "--precision", "fp8",
            "--sharding", "full", "--recompute", "none", "--microbatch", "1", "--global-batch", "128", "--top", "1", "--json"]
    plain, offloaded = run_cli(*args), run_cli(*args, "--cpu-offload-layers", "40")
    assert plain.returncode == 0 and offloaded.returncode == 0, offloaded.stderr
    act = [json.loads(p.stdout)["plans"][0]["memory_breakdown_gib"]["activations"] for p in (plain, offloaded)]
    assert act[1] < act[0] * 0.55  # 41 of 80 layers' activations stay on the GPU
    bad = run_cli(*args, "--cpu-offload-layers", "-1")
    assert bad.returncode == 2 and "--cpu-offload-layers" in bad.stderr


def test_deepspeed_overlaps_only_zero3_gradient_reduction():
    # DeepSpeed's overlap_comm defaults to stage == 3: ZeRO-3's reduce-scatter runs under the
    # backward; its weight gathers (prefetch bucket 5e7 elements) and ZeRO-1/2 reductions do not.
    ds = PROFILES["deepspeed"]
    req = build_request(GPT3, 384, "a100-80gb", node="dgx-a100", seq_len=2048, global_batch=1536, software=ds)
    zero3 = Layout(dp_shard=384, sharding="full", microbatch=4, recompute="full")
    est = estimate(req.work, zero3, req.system, ds)
    serial = estimate(req.work, zero3, req.system, replace(ds, overlap_zero3_reduce=False))
    reduce_key = next(k for k in est.terms if k.startswith("comm: dp gradient"))
    gather_key = next(k for k in est.terms if k.startswith("comm: dp weight"))
    assert est.terms[gather_key] == pytest.approx(serial.terms[gather_key])  # gathers in line either way
    assert est.terms[reduce_key] < 0.2 * serial.terms[reduce_key]  # the backward hides most of it
    zero1 = Layout(dp_shard=384, sharding="optimizer", microbatch=4, recompute="full")
    assert estimate(req.work, zero1, req.system, ds).step_time_s == pytest.approx(
        estimate(req.work, zero1, req.system, replace(ds, overlap_zero3_reduce=False)).step_time_s)


def test_module_recompute_repeats_exactly_the_named_modules():
    """Megatron-Core's --recompute-modules (Software.recompute_modules): "mlp" repeats the dense
    MLP's forward (its two GEMMs, 2 FLOPs a weight, and its activation pass) and keeps none of
    its inside (Korthikanti Table 2's MLP: 8sbh/t + 8sbh/t for GELU's input and output); its
    input and the dropout mask stay. "core_attn" alone is Megatron's default selective policy."""
    from supercluster.plan.cost import Rates, _layer_classes, eager_traffic

    s, b, t, B = 2048, 1, 8, 64
    h, f, L = GPT3.hidden, GPT3.ffn_hidden, GPT3.layers
    req = build_request(GPT3, 64, "h100", seq_len=s, global_batch=B, software=PROFILES["megatron"])
    lay = Layout(tp=t, pp=8, microbatch=b, sharding="none", recompute="selective", sequence_parallel=False)
    sw = req.software
    mlp_sw = replace(sw, recompute_modules=("mlp",))
    none, mlp = estimate(req.work, replace(lay, recompute="none"), req.system, sw), estimate(req.work, lay, req.system, mlp_sw)
    flops = lambda e: e.hardware_tflops_per_gpu * 1e12 * e.step_time_s * 64  # noqa: E731
    assert flops(mlp) - flops(none) == pytest.approx(2 * 2 * h * f * L * B * s, rel=1e-9)  # the MLP forward again
    sbh = s * b * h
    act = lambda sw_, rc: _activation_bytes_per_layer(GPT3, replace(lay, recompute=rc), sw_, s)  # noqa: E731
    assert act(sw, "none") - act(mlp_sw, "selective") == pytest.approx(16 * sbh / t)
    # Seconds: the two MLP GEMMs' forward and one pass over the MLP's elementwise elements.
    r = Rates(req.system, mlp_sw, load_constants("megatron"))
    tokens = b * s
    expected = (r.gemm(tokens, h, f / t, linear=True) + r.gemm(tokens, f / t, h, linear=True)
                + r.memory_pass(eager_traffic(GPT3, mlp_sw) * r.elem * 2 * tokens * h * (2 * f / h) / t))
    assert _layer_classes(GPT3, lay, mlp_sw, r, s)["recompute"] == pytest.approx(expected, rel=1e-12)
    # core_attn alone: the profile's own selective policy, to the bit.
    attn_sw = replace(sw, recompute_modules=("core_attn",))
    assert _layer_classes(GPT3, lay, attn_sw, r, s) == _layer_classes(GPT3, lay, sw, r, s)
    assert estimate(req.work, lay, req.system, attn_sw).step_time_s == estimate(req.work, lay, req.system, sw).step_time_s
    assert act(attn_sw, "selective") == act(sw, "selective")
    # Both: the sum of the two.
    both = replace(sw, recompute_modules=("core_attn", "mlp"))
    rec = lambda sw_: _layer_classes(GPT3, lay, sw_, r, s)["recompute"]  # noqa: E731
    assert rec(both) == pytest.approx(rec(attn_sw) + rec(mlp_sw), rel=1e-12)
    with pytest.raises(UserError, match="--recompute-modules takes"):
        calibrate.with_switches(sw, recompute_modules=("mlpp",))


def test_flash_attention_runs_at_its_dies_clocks_not_at_its_hbm():
    """A flash-attention kernel keeps its scores on chip (Dao et al. 2022, Theorem 2): parts of
    one die run it at their clocks, whatever HBM they carry (`cost.flash_attention_bandwidth`).
    An H200 (H100 clocks, 4.8 TB/s HBM3e) takes an H100's attention time; Grand Teton's 500 W
    H100 (2.4 TB/s HBM2e) its clock ratio longer, not its bandwidth ratio. Unfused attention
    writes its scores to HBM and still follows the bandwidth."""
    from supercluster.hardware.catalog import accelerator, node_type
    from supercluster.plan.cost import Rates, System, _layer_classes

    llama8b = ModelConfig(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab_size=128256,
                          max_seq_len=32768, norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
                          tie_embeddings=False)
    lay = Layout(microbatch=1, recompute="full")

    def attention(gpu: str, node: str, stack: str) -> float:
        sw = PROFILES[stack]
        r = Rates(System(accelerator(gpu), node_type(node), "bf16"), sw, load_constants(stack))
        return sum(_layer_classes(llama8b, lay, sw, r, 32768)["attention"])

    h100 = attention("h100", "dgx-h100", "supercluster")
    assert attention("h200", "hgx-h200", "supercluster") == pytest.approx(h100, rel=0.01)
    clocks = accelerator("h100").achievable("bf16") / accelerator("h100-gt96").achievable("bf16")  # 1.116
    assert attention("h100-gt96", "grand-teton", "supercluster") == pytest.approx(h100 * clocks, rel=0.01)
    # Without a die reference (or unfused) the part's own HBM sets the time: the H200 is faster.
    assert attention("h200", "hgx-h200", "megatron-2021") < 0.85 * attention("h100", "dgx-h100", "megatron-2021")


def test_torch_ring_attention_pays_its_fp32_merges_and_repeated_kv():
    """PyTorch's experimental ring attention as torchtitan ran it (`torch-ring-cp`): every ring
    step after the first merges its partial output in fp32 and the backward accumulates and
    rotates dQ, dK, dV in fp32 (`cost.torch_ring_bytes`, per element of the local queries);
    K and V repeated to every query head are all-gathered in the forward, the recompute and the
    backward. Without context parallelism the switch changes nothing."""
    from supercluster.hardware.catalog import accelerator, node_type
    from supercluster.plan.cost import (TORCH_RING_BWD_CALL_BYTES, TORCH_RING_BWD_LATER_STEP_BYTES,
                                        TORCH_RING_BWD_STEP_BYTES, TORCH_RING_FWD_CALL_BYTES,
                                        TORCH_RING_FWD_STEP_BYTES, Rates, System, Workload, _layer_classes,
                                        torch_ring_bytes)

    assert torch_ring_bytes(1, 1e9) == (0.0, 0.0)
    assert torch_ring_bytes(8, 1.0) == (7 * TORCH_RING_FWD_STEP_BYTES + TORCH_RING_FWD_CALL_BYTES,
                                        TORCH_RING_BWD_CALL_BYTES + 8 * TORCH_RING_BWD_STEP_BYTES
                                        + 7 * TORCH_RING_BWD_LATER_STEP_BYTES)
    s, cp = 262144, 8
    llama8b = ModelConfig(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab_size=128256,
                          max_seq_len=s, norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False)
    base = PROFILES["supercluster"]
    ring = calibrate.with_switches(base, torch_ring_cp=True)
    assert calibrate.SWITCHES["torch-ring-cp"] == ("torch_ring_cp", True)
    system = System(accelerator("h100-gt96"), node_type("grand-teton"), "bf16")
    r = Rates(system, base, load_constants("supercluster"))
    lay = Layout(cp=cp, microbatch=1, recompute="full")
    plain, ringed = _layer_classes(llama8b, lay, base, r, s), _layer_classes(llama8b, lay, ring, r, s)
    fwd, bwd = torch_ring_bytes(cp, s // cp * llama8b.heads * llama8b.head_dim)
    assert ringed["attention"][0] - plain["attention"][0] == pytest.approx(r.memory_pass(fwd), rel=1e-9)
    assert ringed["attention"][1] - plain["attention"][1] == pytest.approx(r.memory_pass(bwd), rel=1e-9)
    work = Workload(llama8b, s, 1)
    key = "comm: cp all-gather K/V (scale-up)"
    ratio = estimate(work, lay, system, ring).terms[key] / estimate(work, lay, system, base).terms[key]
    assert ratio == pytest.approx(llama8b.heads / llama8b.kv_heads * 3 / 2, rel=0.01)  # 4x the bytes, 3 passes not 2 (+ latencies)
    one = replace(lay, cp=1)
    assert estimate(Workload(llama8b, s // cp, 1), one, system, ring).step_time_s == \
        estimate(Workload(llama8b, s // cp, 1), one, system, base).step_time_s


def test_plan_takes_recompute_modules_only_with_selective_recompute():
    args = ["plan", "llama3-70b", "--gpus", "64", "--stack", "megatron", "--sharding", "full", "--microbatch", "1",
            "--global-batch", "128", "--top", "1", "--json"]
    attn, mlp = (run_cli(*args, "--recompute", "selective", "--recompute-modules", mods) for mods in ("core_attn", "core_attn,mlp"))
    assert attn.returncode == 0 and mlp.returncode == 0, mlp.stderr
    steps = [json.loads(p.stdout)["plans"][0]["step_time_s"] for p in (attn, mlp)]
    assert steps[1] > steps[0]  # the MLP's forward again
    for extra, message in ((["--recompute", "full", "--recompute-modules", "mlp"], "pass --recompute selective"),
                           (["--recompute", "selective", "--recompute-modules", "mlpp"], "--recompute-modules takes")):
        bad = run_cli(*args, *extra)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
