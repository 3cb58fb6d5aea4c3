"""The serving engine and its OpenAI-compatible API, against a live `supercluster serve` on
loopback, spoken to with the official `openai` client."""

import concurrent.futures
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from supercluster.errors import UserError
from supercluster.model.transformer import draw

SCRIPT = Path(sys.executable).with_name("supercluster")
KEY = "test-key"
PROMPTS = ["def parse(self, text):", "import os\nimport sys\n\n", "class Reader:\n    def __init__(self", "x = [", "return"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def start_server(run_dir: Path, *args: str):
    port = free_port()
    proc = subprocess.Popen([str(SCRIPT), "serve", str(run_dir), "--port", str(port), "--api-key", KEY,
                             "--kv-cache-gib", "0.01", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def server(run_dir):
    # fp32: this module's tests compare answers across requests and batch shapes to float tolerance,
    # and `--precision auto` picks bf16 where the CPU runs it faster (AVX-512 BF16), whose rounding
    # differs with the rows a matmul sees (a whole answer and its stream 2.6e-3 apart on a Zen 4)
    proc, base = start_server(run_dir, "--precision", "fp32")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(re.search(rf"^{name}(?:_total)? (\S+)$", text, re.M).group(1))


def complete(client, prompt, **kw):
    kw = {"model": "tiny-run", "max_tokens": 24, "temperature": 0, **kw}
    return client.completions.create(prompt=prompt, **kw).choices[0].text


def test_completions_and_chat_sync_and_streaming(client):
    whole = client.completions.create(model="tiny-run", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.usage.completion_tokens <= 12
    streamed = client.completions.create(model="tiny-run", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text  # streaming changes nothing

    messages = [{"role": "user", "content": "def"}]
    reply = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny-run"]


def test_sampling_options(client):
    seeded = [complete(client, PROMPTS[1], temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed makes sampling repeatable
    few = client.completions.create(model="tiny-run", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=3)
    lp = few.choices[0].logprobs
    assert len(lp.tokens) == 5 and all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs)
    text = complete(client, PROMPTS[1], max_tokens=30)
    if len(text) > 3:  # a stop string cuts the text before it
        stop = text[2:4]
        assert complete(client, PROMPTS[1], max_tokens=30, stop=[stop]) == text[: text.find(stop)]
    n = client.completions.create(model="tiny-run", prompt=PROMPTS[2], max_tokens=6, n=3, temperature=1.0, seed=1)
    assert sorted(c.index for c in n.choices) == [0, 1, 2]
    extra = client.completions.create(model="tiny-run", prompt="x", max_tokens=2,
                                      extra_body={"ignore_eos": True, "repetition_penalty": 1.1, "user": "u"})
    assert extra.usage.completion_tokens == 2


def test_draw_follows_its_weights_and_never_picks_a_zero():
    """The sampler's draw: each index as often as its share of the weights (within 4 standard
    errors over 10,000 draws), never one of weight 0, the same draws from the same seed whatever
    the weights' scale."""
    weights, n = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0]), 10_000
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(weights, g) for _ in range(n)]), minlength=5)
    assert counts[1] == counts[4] == 0
    for i in (0, 2, 3):
        p = float(weights[i])
        assert abs(float(counts[i]) / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (i, counts)
    draws = [[draw(w, gen) for _ in range(50)] for w, gen in ((weights, torch.Generator().manual_seed(3)),
                                                              (weights * 7, torch.Generator().manual_seed(3)))]
    assert draws[0] == draws[1]


def test_greedy_output_in_a_full_batch_equals_each_request_alone(client):
    alone = [complete(client, p, max_tokens=20 + 4 * i) for i, p in enumerate(PROMPTS)]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        together = list(pool.map(lambda i: complete(client, PROMPTS[i % len(PROMPTS)], max_tokens=20 + 4 * (i % len(PROMPTS))),
                                 range(len(PROMPTS) * 2)))
    assert together == alone + alone


def test_prefix_reuse_is_hit_and_changes_nothing(client, server):
    long_prompt = "import json\nimport os\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n"
    first = complete(client, long_prompt, max_tokens=8)
    before = metric(server, "supercluster_prefix_cache_hit_blocks")
    second = complete(client, long_prompt, max_tokens=8)
    assert metric(server, "supercluster_prefix_cache_hit_blocks") > before
    assert second == first


def test_a_cancelled_stream_frees_its_blocks(client, server):
    stream = client.completions.create(model="tiny-run", prompt=PROMPTS[3], max_tokens=90, temperature=1.0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert metric(server, "supercluster_kv_cache_blocks_used") > 0
    stream.close()  # the client goes away mid-generation
    for _ in range(100):
        if metric(server, "supercluster_kv_cache_blocks_used") == 0 and metric(server, "supercluster_num_requests_running") == 0:
            break
        time.sleep(0.05)
    assert metric(server, "supercluster_kv_cache_blocks_used") == 0


def test_errors_use_openai_bodies(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server}/health").status_code == 200  # open without a key
    with pytest.raises(openai.NotFoundError):
        complete(client, "x", model="no-such-model")
    with pytest.raises(openai.BadRequestError, match="context of 128 tokens"):
        complete(client, "x", max_tokens=500)
    bad = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    wrong_type = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": "tiny-run", "prompt": "x", "max_tokens": "many"})
    assert wrong_type.status_code == 400 and "max_tokens" in wrong_type.json()["error"]["message"]


def test_a_whole_answer_whose_client_leaves_is_aborted(server):
    """A non-streamed request whose client closes its connection mid-generation stops decoding
    and gives its KV blocks back, while other results keep coming (no pause for a poll to see)."""
    before = metric(server, "supercluster_generation_tokens")
    body = json.dumps({"model": "tiny-run", "prompt": "x", "max_tokens": 120, "n": 16, "ignore_eos": True}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        for _ in range(600):  # until it is decoding
            if metric(server, "supercluster_generation_tokens") > before:
                break
            time.sleep(0.01)
        assert metric(server, "supercluster_kv_cache_blocks_used") > 0
    for _ in range(200):
        if metric(server, "supercluster_num_requests_running") == 0:
            break
        time.sleep(0.05)
    assert metric(server, "supercluster_kv_cache_blocks_used") == 0
    assert metric(server, "supercluster_generation_tokens") - before < 16 * 120  # stopped early, not run to the end


def test_bad_sampling_values_are_400_naming_the_field(client, server):
    """Out-of-range, infinite and NaN sampling values, seeds beyond int64 and content parts whose
    text is not a string: a 400 in OpenAI's body naming the field, never a 500."""
    cases = [({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"top_p": 0}, "top_p"),
             ({"max_tokens": -1}, "max_tokens"), ({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed")]
    for fields, name in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny-run", prompt="x", **fields)
        assert err.value.body["param"] == name and f"'{name}'" in err.value.message, (fields, err.value.message)
    for raw, name in ((b'"temperature": NaN', "temperature"), (b'"temperature": Infinity', "temperature"),
                      (b'"top_p": NaN', "top_p"), (b'"temperature": 1e999', "temperature")):
        r = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                       content=b'{"model": "tiny-run", "prompt": "x", ' + raw + b"}")
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (raw, r.text)
        assert "finite number" in r.json()["error"]["message"]
    for part, where in (({"type": "text", "text": 5}, "messages.0.content.0.text"), ({"type": "text"}, "messages.0.content.0.text"),
                        ("hello", "messages.0.content.0"), ({"text": "no type"}, "messages.0.content.0.type")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-run", messages=[{"role": "user", "content": [part]}], max_tokens=2)
        assert err.value.body["param"] == where and f"at '{where}'" in err.value.message, (part, err.value.message)
    with pytest.raises(openai.BadRequestError, match="at 'prompt'"):  # a union's wrong type names the field alone
        client.completions.create(model="tiny-run", prompt=5)
    # the edges themselves are accepted; an image part is refused (this model reads text), text parts are read
    assert complete(client, "x", max_tokens=2, seed=2**63 - 1, top_p=1e-9) is not None
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="tiny-run", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "def"}]}])
    reply = client.chat.completions.create(model="tiny-run", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "text", "text": "de"}, {"type": "text", "text": "f"}]}])
    assert reply.usage.completion_tokens == 2


def test_continuous_usage_counts_every_chunk(client):
    """vLLM's `continuous_usage_stats`: every chunk carries the usage so far (what the service's
    relay counts when a stream is cut short), ending at the final usage."""
    chunks = list(client.completions.create(model="tiny-run", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == [1, 2, 3, 4, 5, 6, 6, 6]  # six tokens, the finish chunk, the final usage chunk
    assert {c.usage.prompt_tokens for c in chunks} == {chunks[-1].usage.prompt_tokens} and chunks[-1].choices == []
    plain = list(client.completions.create(model="tiny-run", prompt=PROMPTS[0], max_tokens=3, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert [c.usage is None for c in plain] == [True] * (len(plain) - 1) + [False]


def test_a_request_beyond_the_whole_kv_cache_is_refused_at_once(run_dir):
    """A request that could never fit the KV pool (it would preempt itself forever) is refused
    naming the sizes; one that just fits runs to its end."""
    import queue

    from supercluster.serve.engine import Engine, EngineConfig
    from supercluster.serve.sampling import SamplingParams

    engine = Engine(run_dir, EngineConfig(precision="fp32", num_blocks=3, block_size=4))
    try:
        assert engine.room == 12
        with pytest.raises(UserError, match=r"prompt \(5 tokens\) plus max_tokens \(8\) is beyond this server's whole "
                                            r"KV cache of 12 tokens \(3 blocks of 4\)"):
            engine.submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=8), lambda ev: None)
        events = queue.Queue()
        engine.submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), events.put)
        while "finish_reason" not in (event := events.get(timeout=60)):
            assert "error" not in event
        assert (event["finish_reason"], event["completion_tokens"]) == ("length", 7)
        assert engine.snapshot()["kv_blocks_used"] == 0
    finally:
        engine.shutdown()


def test_a_full_queue_answers_429(run_dir):
    proc, base = start_server(run_dir, "--max-running", "1", "--max-queue", "1")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)

        def one(_):
            try:
                complete(client, PROMPTS[0], max_tokens=60, extra_body={"ignore_eos": True})
                return 200
            except openai.RateLimitError:
                return 429

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
        assert 429 in codes and 200 in codes
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_serve_invocations_are_one_sentence(run_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        out = subprocess.run([str(SCRIPT), "serve", str(run_dir), "--port", str(busy.getsockname()[1])],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Cannot listen" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([str(SCRIPT), "serve", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert out.returncode == 2 and "not a run directory" in out.stderr
    (tmp_path / "empty.key").write_text("\n")
    for flags, message in ((["--quantize", "int3"], "--quantize must be one of"), (["--threads", "0"], "--threads must be"),
                           (["--api-key-file", str(tmp_path / "missing.key")], "Cannot read --api-key-file"),
                           (["--api-key-file", str(tmp_path / "empty.key")], "holds no key"),
                           (["--tp", "2", "--quantize", "int8"], "--quantize runs on one rank"),
                           (["--speculate", "17"], "--speculate must be 0 (off) to 16")):
        out = subprocess.run([str(SCRIPT), "serve", str(run_dir), "--port", str(free_port()), *flags],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_int8_weights_decode_in_every_precision(run_dir):
    """int8 linears hand attention fp32 activations, while autocast's attention answers in bf16:
    the engine runs both ways."""
    for precision in ("fp32", "bf16"):
        outputs, _ = engine_outputs(run_dir, PROMPTS[:2], 6, quantize="int8", precision=precision)
        assert [len(o) for o in outputs] == [6, 6], precision


def test_int4_weights_give_every_request_its_own_greedy_output_in_any_batch(run_dir):
    """int4 quantizes each row of activations on its own, so a request's greedy tokens do not
    depend on what else runs in its steps: a full batch with chunked prefill equals each request
    alone. Asked for bf16, an int4 engine still runs (its kernel takes fp32)."""
    prompts = [p * 2 for p in PROMPTS[:4]]
    together, _ = engine_outputs(run_dir, prompts, 12, quantize="int4", max_step_tokens=7)
    alone = [engine_outputs(run_dir, [p], 12, quantize="int4")[0][0] for p in prompts]
    assert together == alone and all(len(o) == 12 for o in together)
    outputs, _ = engine_outputs(run_dir, prompts[:1], 4, quantize="int4", precision="bf16")
    assert len(outputs[0]) == 4


def test_int4_layers_in_one_call_compute_the_models_own_forward(run_dir):
    """An int4 engine runs its layers as one C++ call (norms, RoPE and SwiGLU folded into the
    kernels); the model's own forward over the same weights and an equal KV cache gives the same
    logits, through a step of two prompt chunks and then a step of decoded tokens."""
    from supercluster.serve.engine import Engine, EngineConfig
    from supercluster.serve.kv_cache import PagedKVCache
    from supercluster.serve.runner import LocalRunner, StepBatch

    engine = Engine(run_dir, EngineConfig(quantize="int4"))
    engine.shutdown()
    fused = engine.runner
    assert fused.fused is not None and engine.kv_dtype == torch.float16
    pool = engine.cache
    unfused = LocalRunner(engine.model, PagedKVCache(engine.cfg.layers, pool.pool.num_blocks, pool.block_size,
                                                     engine.cfg.kv_heads, engine.cfg.head_dim, torch.float16,
                                                     torch.device("cpu")), torch.device("cpu"))
    unfused.fused = None
    prompts = [engine.tokenizer.encode(p * 3).ids for p in PROMPTS[:2]]
    first = StepBatch(prompts[0] + prompts[1], [(0, len(prompts[0]), [0, 1, 2, 3]), (0, len(prompts[1]), [4, 5, 6, 7])])
    second = StepBatch([7, 9], [(len(prompts[0]), 1, [0, 1, 2, 3]), (len(prompts[1]), 1, [4, 5, 6, 7])])
    for step in (first, second):
        expected = unfused.run(step)
        got = fused.run(step)
        assert got.shape == expected.shape == (2, engine.cfg.vocab_size)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def engine_outputs(run_dir, prompts, max_tokens, **config):
    """Greedy continuations of all prompts submitted at once to an engine built with `config`."""
    from supercluster.serve.engine import Engine, EngineConfig

    config.setdefault("precision", "fp32")  # bf16 rounding differs with the rows a matmul sees
    engine = Engine(run_dir, EngineConfig(**config))
    try:
        return greedy(engine, prompts, max_tokens), engine.snapshot()
    finally:
        engine.shutdown()


def greedy(engine, prompts, max_tokens):
    from supercluster.serve.sampling import SamplingParams

    requests = [(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)) for prompt in prompts]
    return [[event["token"] for event in events[:-1]] for events in request_events(engine, requests)]


def request_events(engine, requests):
    """Every event of each (prompt, SamplingParams) request, all submitted at once, its finish last."""
    import queue

    streams = []
    for prompt, params in requests:  # text, or token ids
        ids = engine.tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt
        events = queue.Queue()
        engine.submit(ids, params, events.put)
        streams.append(events)
    outputs = []
    for events in streams:
        got = [events.get(timeout=120)]
        while "finish_reason" not in got[-1]:
            assert "error" not in got[-1], got[-1]["error"]
            got.append(events.get(timeout=120))
        outputs.append(got)
    return outputs


def test_chunked_prefill_and_preemption_change_no_greedy_output(run_dir):
    """Prompts cut into 5-token prefill chunks, and a KV pool so small that sequences are
    preempted and recomputed, give the same greedy tokens as a roomy engine."""
    prompts = [p * 3 for p in PROMPTS[:4]]
    reference, _ = engine_outputs(run_dir, prompts, 24, kv_cache_gib=0.01)
    chunked, _ = engine_outputs(run_dir, prompts, 24, max_step_tokens=5, kv_cache_gib=0.01)
    assert chunked == reference
    longest = max(len(p) for p in prompts) + 24  # characters bound tokens from above
    squeezed, snap = engine_outputs(run_dir, prompts, 24, block_size=4, num_blocks=-(-longest // 4) + 2)
    assert snap["preemptions"] > 0 and squeezed == reference
    assert snap["kv_blocks_used"] == 0  # every finished sequence gave its blocks back


def speculation_requests():
    """Greedy requests whose drafts are accepted (repeated text, the model's own loops), ended by
    max_tokens and a stop string inside a run of accepted drafts, with logprobs and a penalty
    (verified per draft position), beside a sampled request (never drafted for)."""
    from supercluster.serve.sampling import SamplingParams

    def params(**kw):
        return SamplingParams(**{"temperature": 0, "ignore_eos": True, **kw})

    return [(PROMPTS[0] * 3, params(max_tokens=24)), (PROMPTS[1] * 3, params(max_tokens=13)),
            (PROMPTS[3], params(max_tokens=20, logprobs=2)), (PROMPTS[2] * 2, params(max_tokens=20, frequency_penalty=0.5)),
            (PROMPTS[4], params(max_tokens=30, stop=["      "])), ("x = [1, 2]\nx = [", params(max_tokens=12)),
            (PROMPTS[2] * 4, SamplingParams(max_tokens=16, temperature=1.0, seed=3))]


def spoil_every_other_draft(engine) -> None:
    """Change the third token of every other draft: the model rejects it there, after keeping the
    first two where it would (the tiny model's own loops), whatever the freshly trained model writes."""
    propose, calls = engine.scheduler.propose, iter(range(10**9))

    def spoiled(seq, most):
        draft = propose(seq, most)
        if len(draft) >= 3 and next(calls) % 2:
            draft[2] = (draft[2] + 1) % engine.cfg.vocab_size
        return draft

    engine.scheduler.propose = spoiled


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_speculative_decoding_changes_no_greedy_output(run_dir, quantize):
    """With prompt-lookup drafts (`speculate`) every greedy request gets the tokens, text,
    log-probabilities and finish it gets decoding a token a step, in a batch with others and
    prompts prefilled in chunks, on the model's own forward and on the int4 one-call decoder
    (logits at every draft position from both); drafts are accepted, rejected at once and in part
    (rolled back out of the cache), counted, and every block comes back."""
    from supercluster.serve.engine import Engine, EngineConfig

    runs = {}
    for speculate in (0, 4):
        engine = Engine(run_dir, EngineConfig(precision="fp32", quantize=quantize, max_step_tokens=16, speculate=speculate))
        try:
            free = engine.cache.pool.available()
            if speculate:
                spoil_every_other_draft(engine)
            runs[speculate] = request_events(engine, speculation_requests()), engine.snapshot()
            assert engine.cache.pool.available() == free and engine.snapshot()["kv_blocks_used"] == 0
        finally:
            engine.shutdown()
    (plain, before), (drafted, after) = runs[0], runs[4]
    assert before["draft_tokens"] == 0 and 0 < after["accepted_tokens"] < after["draft_tokens"]
    assert plain[1][-1]["completion_tokens"] == 13 and plain[4][-1]["finish_reason"] == "stop"  # cut mid-run
    for want, got in zip(plain[:-1], drafted[:-1]):
        (want, want_floats), (got, got_floats) = _floats_apart(want), _floats_apart(got)
        assert got == want and got_floats == pytest.approx(want_floats, abs=1e-4)
    assert drafted[-1][-1]["completion_tokens"] == 16


def test_a_speculating_server_streams_each_accepted_token_and_counts_acceptance(run_dir, client):
    """`serve --speculate 4`: several tokens of one step stream as a chunk each, with the usage
    so far, the same text as a whole answer and as a server without drafts; /metrics counts the
    drafted and accepted tokens."""
    body = {"max_tokens": 10, "logprobs": 1, "extra_body": {"ignore_eos": True}}
    prompt = PROMPTS[0] * 2
    proc, base = start_server(run_dir, "--speculate", "4")
    try:
        drafting = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        whole = drafting.completions.create(model="tiny-run", prompt=prompt, temperature=0, **body).choices[0]
        chunks = list(drafting.completions.create(model="tiny-run", prompt=prompt, temperature=0, stream=True, **body,
                                                stream_options={"include_usage": True, "continuous_usage_stats": True}))
        accepted = metric(base, "supercluster_spec_decode_num_accepted_tokens")
        drafted = metric(base, "supercluster_spec_decode_num_draft_tokens")
        assert 0 < accepted <= drafted and metric(base, "supercluster_spec_decode_acceptance_rate") == accepted / drafted
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert [c.usage.completion_tokens for c in chunks] == [*range(1, 11), 10, 10]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) == 10
    assert whole.text == complete(client, prompt, **body)  # the server without drafts


@pytest.mark.parametrize("route, body", [
    ("completions", {"prompt": PROMPTS[0], "logprobs": 2}),
    ("chat/completions", {"messages": [{"role": "user", "content": "def"}], "logprobs": True, "top_logprobs": 2}),
])
def test_the_service_rebuilds_a_whole_answer_from_the_stream_as_the_server_answers_it(server, route, body):
    """The service's relay asks for a stream even for a whole answer (so that a caller who leaves
    is charged for what was generated) and rebuilds it (`service.whole`): the same answer as asked whole."""
    from supercluster.service.whole import WholeAnswer

    body = {"model": "tiny-run", "max_tokens": 8, "temperature": 0, "n": 2, **body}
    headers = {"Authorization": f"Bearer {KEY}"}
    whole = httpx.post(f"{server}/v1/{route}", headers=headers, json=body, timeout=120).json()
    rebuilt = WholeAnswer()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{server}/v1/{route}", headers=headers, json=streamed, timeout=120) as r:
        events = r.read().split(b"\n\n")
    for event in events:
        rebuilt.add(event)
    usage = json.loads(next(e for e in reversed(events) if e.startswith(b"data: {"))[6:])["usage"]
    answer = rebuilt.answer(usage)
    assert len(answer["choices"]) == 2 and answer["choices"][0]["logprobs"]
    # Log-probabilities to float tolerance: the second request may reuse the first's cached prefix,
    # computed in another batch shape; everything else exactly.
    (got, got_floats), (want, want_floats) = (_floats_apart({**a, "id": None, "created": None}) for a in (answer, whole))
    assert got == want and got_floats == pytest.approx(want_floats, abs=1e-4)


def _floats_apart(x, floats=None):
    """(x with every float replaced by None, the floats in order)."""
    floats = [] if floats is None else floats
    if isinstance(x, float):
        floats.append(x)
        return None, floats
    if isinstance(x, dict):
        return {k: _floats_apart(v, floats)[0] for k, v in x.items()}, floats
    if isinstance(x, list):
        return [_floats_apart(v, floats)[0] for v in x], floats
    return x, floats


def test_stop_strings_cut_streams_and_whole_responses_alike(client):
    text = complete(client, PROMPTS[2], max_tokens=30)
    if len(text) < 6:
        pytest.skip(f"the tiny model's continuation {text!r} is too short to stop inside")
    stop = text[3:5]
    whole = complete(client, PROMPTS[2], max_tokens=30, stop=[stop])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-run", prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop], stream=True))
    assert whole == streamed == text[: text.find(stop)]


def test_int8_linear_matches_its_dequantized_weight():
    """Int8Linear computes x @ (q * scale).T + b: against that product in fp32, only the bf16
    rounding of activations and scales remains; an unknown method is one sentence."""
    from supercluster.serve.quantize import Int8Linear, quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    layer = Int8Linear(linear)
    x = torch.randn(5, 3, 96)
    dequantized = layer.qweight.float() * layer.scale.float()[:, None]
    half_step = layer.scale.float()[:, None] / 2
    assert ((dequantized - linear.weight).abs() <= half_step * 1.01).all()
    expected = x @ dequantized.T + linear.bias
    got = layer(x)
    assert got.shape == (5, 3, 40) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=0.02 * expected.abs().max().item())
    with pytest.raises(UserError, match="--quantize must be one of"):
        quantize(torch.nn.Sequential(linear), "int3")


def _skip_unless_a_distinct_code_path(arch: str) -> None:
    """The kernels' code paths are chosen by __AVX512F__/__AVX2__/__FMA__/__F16C__: on a CPU with
    AVX2, FMA and F16C but no AVX-512, the native build already runs the AVX2 path, and a second
    build of it (about 25 s on 2 cores) would test nothing new."""
    if arch != "native" and platform.machine() != "x86_64":
        pytest.skip(f"the {arch} build targets x86-64")
    flags = set(next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "").split())
    if arch == "avx2" and "avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    if arch == "avx2" and {"avx2", "fma", "f16c"} <= flags and "avx512f" not in flags:
        pytest.skip("this CPU's native build is the AVX2 code path (no AVX-512), tested as native")


@pytest.mark.parametrize("arch", ["native", "avx2"])
def test_block_linear_asks_for_weights_ahead(arch):
    """The SIMD code paths prefetch the weights 4 KiB ahead of the block they multiply (one stream's
    decode step took 13.7 ms without, 8.9 with, bench/serve.py on a Zen 4). Written as a plain
    inline function, the prefetches vanished from the build without a word: so the built code is read."""
    _skip_unless_a_distinct_code_path(arch)
    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("reads the x86-64 build with objdump (binutils)")
    from supercluster.serve.kernels import library

    if arch == "native" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU's native build is the portable code path, which has no prefetches")
    name = library(arch).name  # built or loaded here
    so = next(path for path in torch.ops.loaded_libraries if name in path)
    listing = subprocess.run(["objdump", "-d", so], capture_output=True, text=True, check=True).stdout
    assert listing.count("prefetcht0") >= 4 * 6  # panel_rows' 4 instantiations: 4 or 8 weight lines, d and m


@pytest.mark.parametrize("arch", ["native", "avx2", "portable"])
def test_block_linear_computes_its_integer_arithmetic(arch):
    """BlockLinear's kernel (each of its code paths: this CPU's, AVX2, portable C++) computes
    x_q @ W_q.T + b, with W_q its 4- or 8-bit blocks and x_q the activations rounded to blocks of 32
    in 8 bits as llama.cpp rounds them (int4-q8act) or in 16 (two int8 planes, +-127*128 steps),
    to fp32 rounding; W_q lies within half a step of the weight.
    Shapes are ragged (padded panels and blocks) and rows span one row tile to many. An RMSNorm or
    SwiGLU folded in before the product, and a residual after, give what they give unfolded."""
    from supercluster.serve.quantize import BlockLinear

    _skip_unless_a_distinct_code_path(arch)
    torch.manual_seed(0)
    for bits, activation_bits in ((4, 8), (8, 8), (4, 16), (8, 16)):
        linear = torch.nn.Linear(100, 70, bias=True).requires_grad_(False)
        layer = BlockLinear(linear, bits, arch, activation_bits)
        weight = layer.dequantized()
        steps = 127 if activation_bits == 8 else 127 * 128
        padded = F.pad(linear.weight, (0, 28)).view(70, 4, 32)
        step = (padded.amax(2) - padded.amin(2)) / 15 if bits == 4 else padded.abs().amax(2) / 127
        error = F.pad(weight - linear.weight, (0, 28)).view(70, 4, 32).abs()
        assert (error <= step[..., None] * 0.5 * 1.01 + 1e-6).all(), bits
        def product(x):  # what the kernel computes: x rounded to blocks of 32, times the blocks
            blocks = F.pad(x.reshape(-1, 100), (0, 28)).view(-1, 4, 32)
            amax = blocks.abs().amax(2, keepdim=True)
            x_q = torch.round(blocks * torch.where(amax > 0, steps / amax, 0)) * amax / steps
            return (x_q.view(-1, 128)[:, :100].double() @ weight.double().T + linear.bias).view(*x.shape[:-1], 70)

        for shape in ((1, 100), (5, 3, 100), (37, 100)):
            x = torch.randn(shape) * torch.linspace(0.1, 30, 100)  # outlier features, as real models have
            expected = product(x)
            got = layer(x)
            assert got.shape == expected.shape and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        # what a layer folds into the call: an RMSNorm before, a residual after; or SwiGLU before
        x, residual = torch.randn(6, 100) * 3, torch.randn(6, 70)
        norm = torch.nn.RMSNorm(100, eps=1e-5)
        norm.weight.data = torch.rand(100) + 0.5
        expected = product(norm(x)) + residual
        torch.testing.assert_close(layer(x, norm=norm, residual=residual).double(), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item())
        gate_up = torch.randn(6, 200) * 2
        expected = product(F.silu(gate_up[:, :100]) * gate_up[:, 100:])
        torch.testing.assert_close(layer(gate_up, swiglu=True).double(), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item())
        # and close to the fp32 product: 4-bit weights are coarse, 8-bit ones close
        x = torch.randn(8, 100)
        relative = ((layer(x) - linear(x)).norm() / linear(x).norm()).item()
        assert relative < (0.1 if bits == 4 else 0.02), (bits, relative)
        # with 16-bit activations only the weights' rounding is left: the product of the
        # dequantized weight with x itself
        if activation_bits == 16:
            exact = x.double() @ weight.double().T + linear.bias
            torch.testing.assert_close(layer(x).double(), exact, rtol=0, atol=3e-4 * exact.abs().max().item())


@pytest.mark.parametrize("arch", ["native", "avx2", "portable"])
def test_block_linear_is_exact_at_the_largest_integer_sums(arch):
    """The kernels add a block's integer products in 16 bits before widening them (AVX2: eight
    maddubs pairs of at most 2*15*127 = 3810 each): with every weight at the top of its grid and
    every activation at +-127 steps, the largest sums there are, the product is still the exact
    one, in 4- and 8-bit weights and 8- and 16-bit activations, for one row and a tile of many."""
    from supercluster.serve.quantize import BlockLinear

    _skip_unless_a_distinct_code_path(arch)
    weight = torch.ones(40, 96)
    weight[:, ::32] = -1.0  # each 4-bit block spans -1..1: every other weight at q = 15; 8-bit ones at 127 (+128)
    for bits, activation_bits in ((4, 8), (8, 8), (4, 16), (8, 16)):
        linear = torch.nn.Linear(96, 40, bias=False).requires_grad_(False)
        linear.weight.copy_(weight)
        layer = BlockLinear(linear, bits, arch, activation_bits)
        for rows in (1, 9):
            x = torch.full((rows, 96), 2.5)
            x[1::2] = -2.5  # every activation at +-127 (hi plane +-127) steps of its block
            expected = x.double() @ layer.dequantized().double().T
            torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("arch", ["native", "avx2", "portable"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float16])
def test_paged_attention_equals_sdpa_on_gathered_contexts(arch, pool_dtype):
    """The attention kernel (each code path; fp32 and fp16 pools), on a step packing prompt chunks
    and decoded tokens of four sequences whose blocks lie scattered in the pool: it stores each
    token's (rotated) key and value at its slot, and each query's output is SDPA's over its own
    sequence's positions up to its own, within 5e-5 (fp32 rounding). Head sizes 64 and 128 and one no code path
    unrolls (40), grouped-query heads, with RoPE applied by the kernel or already applied."""
    from supercluster.model.transformer import apply_rope, rope_tables
    from supercluster.serve.kernels import library

    _skip_unless_a_distinct_code_path(arch)
    attention = library(arch).paged_attention
    torch.manual_seed(0)
    block_size, heads, kv_heads = 16, 6, 2
    for head_dim, rotate in ((64, True), (128, False), (40, False)):
        angles = torch.outer(torch.arange(256.0), 1e4 ** -(torch.arange(head_dim // 2) / (head_dim // 2)))
        rope = torch.cat([angles.cos(), angles.sin()], dim=-1)
        k_pool = torch.randn(40 * block_size, kv_heads, head_dim).to(pool_dtype)  # earlier tokens' keys, values
        v_pool = torch.randn(40 * block_size, kv_heads, head_dim).to(pool_dtype)
        order = torch.randperm(40).tolist()
        # per sequence: position of its first new token, new tokens, block table
        seqs = [(0, 37, order[0:3]), (20, 1, order[3:5]), (5, 12, order[5:7]), (47, 1, order[7:11])]
        T = sum(count for _, count, _ in seqs)
        q, k, v = torch.randn(T, heads * head_dim), torch.randn(T, kv_heads * head_dim), torch.randn(T, kv_heads * head_dim)
        positions = torch.tensor([p for start, count, _ in seqs for p in range(start, start + count)])
        token_seq = torch.tensor([i for i, (_, count, _) in enumerate(seqs) for _ in range(count)])
        tables = torch.tensor([blocks + [0] * (4 - len(blocks)) for _, _, blocks in seqs])
        k_expected, v_expected = k_pool.float(), v_pool.float()
        if rotate:
            cos_sin = rope_tables(rope[positions])
            q_rot = apply_rope(q.view(1, T, heads, head_dim), cos_sin)[0]
            k_rot = apply_rope(k.view(1, T, kv_heads, head_dim), cos_sin)[0]
        else:
            q_rot, k_rot = q.view(T, heads, head_dim), k.view(T, kv_heads, head_dim)
        out = attention(q, k, v, rope if rotate else torch.empty(0), positions, token_seq, tables, block_size,
                        k_pool, v_pool, head_dim ** -0.5).view(T, heads, head_dim)
        offset = 0
        for start, count, blocks in seqs:
            slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(start + count)])
            k_expected[slots[start:]] = k_rot[offset:offset + count].to(pool_dtype).float()
            v_expected[slots[start:]] = v[offset:offset + count].view(count, kv_heads, head_dim).to(pool_dtype).float()
            mask = torch.arange(start + count)[None, :] <= torch.arange(start, start + count)[:, None]
            expected = F.scaled_dot_product_attention(
                q_rot[offset:offset + count].transpose(0, 1)[None], k_expected[slots].transpose(0, 1)[None],
                v_expected[slots].transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
            torch.testing.assert_close(out[offset:offset + count], expected, rtol=1e-4, atol=5e-5)
            offset += count
        assert torch.equal(v_pool.float(), v_expected)  # keys: rotated in fp32 here and there, one rounding apart
        torch.testing.assert_close(k_pool.float(), k_expected, rtol=1e-3 if pool_dtype == torch.float16 else 1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="outside the pool"):
        attention(q, k, v, torch.empty(0), positions, token_seq, tables + 1000, block_size, k_pool, v_pool, 1.0)


def test_packed_linear_keeps_fp32_results_and_autocast():
    """The default serving form of a linear layer (oneDNN-packed fp32) computes nn.Linear's product,
    for any number of rows; under bf16 autocast it is autocast's bf16 linear."""
    from supercluster.serve.quantize import PackedLinear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN: linears stay as they are")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True).requires_grad_(False)
    packed = PackedLinear.pack(linear)
    assert isinstance(packed, PackedLinear)
    for shape in ((1, 1, 96), (3, 17, 96), (300, 96)):
        x = torch.randn(shape)
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(4, 96)
        assert packed(x).dtype == torch.bfloat16
        torch.testing.assert_close(packed(x), linear(x))


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(c) for c in path.read_text().split()} if path.exists() else set()


def test_tensor_parallel_greedy_output_equals_one_rank(run_dir):
    """tp 2 (two CPU processes, each with half the heads) gives the same greedy tokens as one
    rank, for requests of different lengths sharing steps (prefill chunks next to decodes, and
    speculative drafts: each rank returns logits at every draft position);
    its worker is gone after shutdown, and a worker that dies fails requests instead of hanging."""
    import queue

    from supercluster.serve.engine import Engine, EngineConfig
    from supercluster.serve.sampling import SamplingParams

    prompts = [PROMPTS[0] * 3, PROMPTS[1], PROMPTS[2] * 2, PROMPTS[3], PROMPTS[4] * 4]
    reference, _ = engine_outputs(run_dir, prompts, 20, max_step_tokens=24, kv_cache_gib=0.01)
    engine = Engine(run_dir, EngineConfig(precision="fp32", max_step_tokens=24, kv_cache_gib=0.01, tp=2, speculate=4))
    (worker,) = engine.runner.workers
    try:
        assert engine.cache.k.shape[2] == engine.cfg.kv_heads // 2  # each rank caches its own heads
        assert greedy(engine, prompts, 20) == reference and engine.stats.accepted_tokens > 0
        assert engine.runner.problem() == ""
        worker.kill()
        worker.wait()
        assert "rank 1 exited" in engine.runner.problem()  # what /health answers 503 with
        events = queue.Queue()
        engine.submit([1, 2, 3], SamplingParams(max_tokens=4), events.put)
        assert "rank 1 exited" in events.get(timeout=60)["error"]
        # through the API a stream ends with OpenAI's error event and [DONE], not a dropped connection
        from fastapi.testclient import TestClient

        from supercluster.serve.api import create_app

        with TestClient(create_app(engine)) as http:
            r = http.post("/v1/completions", json={"model": engine.name, "prompt": [1, 2, 3], "max_tokens": 4, "stream": True})
        *error, done = [line for line in r.text.splitlines() if line]
        assert error and "rank 1 exited" in json.loads(error[-1][6:])["error"]["message"] and done == "data: [DONE]"
    finally:
        engine.shutdown()
    assert engine.runner.workers == [] and worker.returncode is not None


def test_tensor_parallel_server_and_its_workers_end_together(run_dir):
    proc, base = start_server(run_dir, "--tp", "2", "--precision", "fp32")
    try:
        workers = children(proc.pid)
        assert len(workers) == 1
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        assert complete(client, PROMPTS[0], max_tokens=8)
    finally:
        proc.kill()  # no clean shutdown: the worker must notice by itself
        proc.wait(timeout=30)
    assert "tp 2" in proc.stdout.readline()
    for _ in range(100):
        if not any(Path(f"/proc/{pid}").exists() for pid in workers):
            break
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


@pytest.mark.parametrize("tp, message", [("0", "--tp must be at least 1"), ("3", "--tp 3 must divide the model's 4")])
def test_bad_tp_is_one_sentence(run_dir, tp, message):
    out = subprocess.run([str(SCRIPT), "serve", str(run_dir), "--port", str(free_port()), "--tp", tp],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_build_lock_left_by_a_killed_build_is_cleared_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    from supercluster.serve.kernels import STALE_LOCK_S, _clear_stale_lock

    old, fresh = tmp_path / "old" / "lock", tmp_path / "fresh" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(old, (time.time() - STALE_LOCK_S - 60,) * 2)
    _clear_stale_lock(old)
    _clear_stale_lock(fresh)
    _clear_stale_lock(tmp_path / "none" / "lock")
    assert not old.exists() and fresh.exists()
