"""Serving an imported Mixture-of-Experts model against the dense model of equal active size,
same run, same engine: output tokens/s of greedy decoding at 1 and 16 concurrent streams.

The MoE model is a Mixtral-architecture model written by transformers (`MixtralConfig`, random
weights, `save_pretrained`) and brought in by `supercluster import`; the dense one a Llama written
the same way with the same attention, vocabulary and depth, and an FFN as wide as the experts a
token passes through (ffn = top_k * expert width), so both do the same matmul FLOPs per token.
Each is served by the engine in this process (no HTTP: what differs is the model), in fp32 (the
MoE experts stacked, one grouped matmul) and with `--quantize int4` (per-expert 4-bit blocks).
int4 models run their layers as one C++ call (`serve/fused.py`, MoE layers included: fp32 router,
tokens grouped by expert, each chosen expert's blocks on its own rows); each int4 model is also
measured through its own PyTorch forward ("unfused"), the path the MoE took before its layer was
fused, so one run gives the before and after.

A decode step of one stream reads top_k experts a layer, about the dense model's weights; a
step of 16 streams reaches most experts, so it reads up to experts/top_k times more: the MoE's
advantage is memory-for-FLOPs, and on a CPU serving many streams it pays in bandwidth.

int4, output tokens/s (2-core AMD EPYC, AVX2, shared with other work; MoE 14.4M parameters, 5.0M
active; dense 5.0M; 32 tokens a stream, best of 5 rounds), two runs at load average 8.0 and 9.7:
1 stream MoE 735 and 937 against dense 1007 and 1353 (0.73, 0.69); the MoE through its own forward
292 and 302 (the fused layer 2.5x and 3.1x that), against the dense one's 513 and 525 (0.57).
16 streams MoE 1623 and 1535 against dense 2105 and 2140 (0.77, 0.72); unfused 989 and 939 (the
fused layer 1.6x) against 1635 and 1786 (0.61, 0.53). A third run (3 rounds, load 10.5) gave
0.66 at 1 stream and at 16 streams a fused MoE below its unfused self (775 / 1122), which timing
the decode step alone did not reproduce (16 sequences: best 5.8 ms fused, 13.8 ms unfused). What
is left between the MoE and the dense model at one stream: four block products a layer instead of
two, and the router's ops (about 70 us of a 0.74 ms step, measured by fixing the choice).
Before the MoE layer was fused (one run, load 6): int4 1 stream 420 / 2430 (0.17; 0.46 against
the dense model through the same forward), 16 streams 2023 / 3642 (0.56); fp32 (not re-run) 1
stream 186 / 319 (0.59), 16 streams 858 / 2605 (0.33).

    .venv/bin/python bench/serve_moe.py [--streams 1,16] [--tokens 32] [--quantize none,int4] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import tempfile
import time
from pathlib import Path

import torch

from supercluster.hardware.local import cpu_model

SHAPE = dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
EXPERTS, TOP_K, EXPERT_WIDTH = 8, 2, 512


def write_models(root: Path) -> dict[str, Path]:
    """Two Hugging Face folders, imported into run directories: the MoE and its dense equal."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from supercluster.serve.importing import import_model

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {f"<t{i}>": i for i in range(len(alphabet), SHAPE["vocab_size"])}
    tokenizer = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    runs = {}
    torch.manual_seed(0)
    for name, model in (
        ("moe", MixtralForCausalLM(MixtralConfig(**SHAPE, intermediate_size=EXPERT_WIDTH, num_local_experts=EXPERTS,
                                                 num_experts_per_tok=TOP_K))),
        ("dense", LlamaForCausalLM(LlamaConfig(**SHAPE, intermediate_size=TOP_K * EXPERT_WIDTH))),
    ):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
        model.save_pretrained(root / f"hf-{name}")
        tokenizer.save(str(root / f"hf-{name}" / "tokenizer.json"))
        import_model(root / f"hf-{name}", root / name)
        runs[name] = root / name
    return runs


def engine(run: Path, streams: int, quantize: str, fused: bool = True):
    from supercluster.serve.engine import Engine, EngineConfig

    built = Engine(run, EngineConfig(precision="fp32", quantize=quantize, num_blocks=4 * streams * 8, block_size=16))
    if not fused:  # the model's own forward instead of the one-call int4 decoder
        built.runner.fused = None
    return built


def generate(engine, streams: int, tokens: int, seed: int) -> float:
    """Output tokens/s of `streams` greedy requests submitted at once, `tokens` each."""
    from supercluster.serve.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(256, 2048, (16,), generator=g).tolist() for _ in range(streams)]
    events = []
    start = time.perf_counter()
    for prompt in prompts:
        q = queue.Queue()
        engine.submit(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), q.put)
        events.append(q)
    made = 0
    for q in events:
        while "finish_reason" not in q.get(timeout=600):
            made += 1
    return made / (time.perf_counter() - start)


def rates(engines: dict, streams: int, tokens: int, rounds: int) -> dict[str, float]:
    """Each engine's best of `rounds`, the engines taking turns round by round, so that a machine
    whose other load comes and goes weighs on all of them alike."""
    for e in engines.values():
        generate(e, streams, tokens, 0)  # warm-up: kernels, allocator, caches
    best = dict.fromkeys(engines, 0.0)
    for r in range(rounds):
        for name, e in engines.items():
            best[name] = max(best[name], generate(e, streams, tokens, r + 1))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per stream")
    parser.add_argument("--quantize", default="none,int4")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per engine, taking turns; the best counts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from supercluster.model.config import active_params, num_params
    from supercluster.train.sample import load_trained

    with tempfile.TemporaryDirectory() as tmp:
        runs = write_models(Path(tmp))
        cfgs = {name: load_trained(run).cfg for name, run in runs.items()}
        rows = []
        for quantize in args.quantize.split(","):
            for streams in map(int, args.streams.split(",")):
                engines = {name: engine(run, streams, quantize) for name, run in runs.items()}
                # int4 models run their layers as one C++ call (serve/fused.py); each is also measured
                # through its own PyTorch forward, the path the MoE took before its layer was fused.
                if quantize == "int4":
                    engines["moe_unfused"] = engine(runs["moe"], streams, quantize, fused=False)
                    engines["dense_unfused"] = engine(runs["dense"], streams, quantize, fused=False)
                try:
                    got = rates(engines, streams, args.tokens, args.rounds)
                finally:
                    for e in engines.values():
                        e.shutdown()
                unfused, moe_unfused = got.get("dense_unfused", got["dense"]), got.get("moe_unfused", got["moe"])
                rows.append({"quantize": quantize, "streams": streams, "moe_tokens_per_s": round(got["moe"], 1),
                             "dense_tokens_per_s": round(got["dense"], 1),
                             "moe_over_dense": round(got["moe"] / got["dense"], 3),
                             "moe_unfused_tokens_per_s": round(moe_unfused, 1),
                             "dense_unfused_tokens_per_s": round(unfused, 1),
                             "moe_over_dense_unfused": round(moe_unfused / unfused, 3)})
    report = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "moe_params": num_params(cfgs["moe"]), "moe_active_params": active_params(cfgs["moe"]),
              "dense_params": num_params(cfgs["dense"]), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['cpu']}, {report['threads']} threads, load average {report['load_average'][0]:.1f}")
    print(f"MoE {report['moe_params']:,} parameters ({report['moe_active_params']:,} active); "
          f"dense {report['dense_params']:,}")
    print(f"{'quantize':>8} {'streams':>7} {'MoE tok/s':>10} {'dense tok/s':>12} {'MoE/dense':>10} "
          f"{'MoE unfused':>12} {'dense unfused':>14} {'ratio unfused':>14}")
    for r in rows:
        print(f"{r['quantize']:>8} {r['streams']:>7} {r['moe_tokens_per_s']:>10} {r['dense_tokens_per_s']:>12} "
              f"{r['moe_over_dense']:>10} {r['moe_unfused_tokens_per_s']:>12} {r['dense_unfused_tokens_per_s']:>14} "
              f"{r['moe_over_dense_unfused']:>14}")


if __name__ == "__main__":
    main()
