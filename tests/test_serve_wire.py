"""The OpenAI wire format in full, structured output and tool calling, against a live
`supercluster serve` on loopback, through the official `openai` client where it speaks them.

The tiny model writes nothing sensible: every JSON answer below is JSON because the grammar's
mask allowed nothing else, which is what these tests check."""

import concurrent.futures
import json
import subprocess

import httpx
import jsonschema
import openai
import pytest
import torch
from test_serve import KEY, SCRIPT, start_server

from supercluster.serve.tokens import ChatTemplate
from supercluster.serve.tools import ToolStream, parse

MODEL = "tiny-wire"
PROMPT = "def parse(self, text):"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_corpus):
    # A context long enough for a system message listing tools (the tiny tokenizer spends many tokens on JSON).
    run = tmp_path_factory.mktemp("wire") / MODEL
    out = subprocess.run([str(SCRIPT), "train", "configs/tiny.toml", "--set", f"run.dir={run}", "--set", f"data.path={small_corpus}",
                          "--set", "train.steps=4", "--set", "train.eval_every=0", "--set", "model.max_seq_len=1024",
                          "--no-sample"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    proc, base = start_server(run_dir, "--precision", "fp32", "--kv-cache-gib", "0.05")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def post(server, path, body):
    return httpx.post(f"{server}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_every_prompt_form_gives_one_choice_per_prompt_in_order(client, server):
    ids = post(server, "/tokenize", {"prompt": PROMPT})
    assert ids.status_code == 200
    tokens = ids.json()["tokens"]
    assert post(server, "/detokenize", {"tokens": tokens}).json()["prompt"] == PROMPT
    others = post(server, "/tokenize", {"prompt": "x = ["}).json()["tokens"]

    def texts(prompt, n=1):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, n=n)
        assert [c.index for c in r.choices] == list(range(len(r.choices)))
        return [c.text for c in r.choices], r.usage.prompt_tokens

    alone, first = texts(PROMPT)[0][0], texts("x = [")[0][0]
    assert texts(PROMPT) == ([alone], len(tokens))
    assert texts([PROMPT, "x = ["]) == ([alone, first], len(tokens) + len(others))
    assert texts(tokens) == ([alone], len(tokens))
    assert texts([tokens, others], n=2) == ([alone, alone, first, first], len(tokens) + len(others))
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=MODEL, prompt=[[]], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="Token ids"):
        client.completions.create(model=MODEL, prompt=[10**6], max_tokens=2)


def test_echo_logprobs_equal_a_forward_pass_over_the_same_ids(client, server, run_dir):
    from supercluster.train.sample import load_trained

    tokens = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == PROMPT and echo.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and "".join(lp.tokens) == PROMPT

    model = load_trained(run_dir).eval()
    with torch.inference_mode():
        positions = torch.arange(len(tokens))
        logits = model(torch.tensor(tokens)[None], positions, logits_index=positions)[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= lp.token_logprobs[i + 1] - 1e-6 for i, top in enumerate(lp.top_logprobs[1:]))

    # with generation: the prompt's entries, then the output's
    more = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, logprobs=0, temperature=0)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert more.choices[0].text == PROMPT + plain.choices[0].text
    assert len(more.choices[0].logprobs.tokens) == len(tokens) + plain.usage.completion_tokens
    offsets = more.choices[0].logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, temperature=0, stream=True))
    assert streamed == more.choices[0].text
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)


def test_logprob_tokens_are_decoded_text_with_their_bytes(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    tokens = r.choices[0].logprobs.tokens
    assert "".join(tokens) == r.choices[0].text  # ASCII output: the tokens' texts are the text
    assert not any("Ġ" in t or "Ċ" in t for t in tokens + [k for top in r.choices[0].logprobs.top_logprobs for k in top])
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    for entry in chat.choices[0].logprobs.content:
        assert bytes(entry.bytes).decode() == entry.token and len(entry.top_logprobs) == 2
        assert all(bytes(t.bytes).decode() == t.token for t in entry.top_logprobs)


def test_unknown_or_unsupported_fields_are_refused_by_name(client, server):
    for fields, name in (({"logit_bias": {"1": 5}}, "logit_bias"), ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"),
                         ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x")):
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, **fields})
        assert r.status_code == 400 and r.json()["error"]["message"] == f"The field '{name}' is not supported by this server."
        assert r.json()["error"]["param"] == name
    with pytest.raises(openai.BadRequestError, match="'messages.0.content.0.image_url' is not supported"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    with pytest.raises(openai.BadRequestError, match="'audio' is not supported"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"audio": {"voice": "x"}})
    # documented as accepted and ignored
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1, user="someone").usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError, match="one output constraint"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    with pytest.raises(openai.BadRequestError, match="cannot be compiled"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"guided_regex": "(unclosed"})



def test_prompts_and_constraints_beyond_the_limits_are_400s_naming_them(server):
    """Found by a review: ids outside the vocabulary reached the decoder (500), an echo scored a
    prompt past the context (500), one request could queue any number of sequences, and a schema
    of any depth or size reached the compiler."""
    for prompt in ([-1], [10**30], [[5, -3]]):
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1, "echo": True})
        assert r.status_code == 400 and "Token ids must be in" in r.json()["error"]["message"], (prompt, r.text)
    long = [5] * 1100  # the model's context is 1024
    for extra in ({"max_tokens": 0, "echo": True}, {"max_tokens": 1, "echo": True, "logprobs": 1}):
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": long, **extra})
        assert r.status_code == 400 and "beyond this model's context of 1024" in r.json()["error"]["message"], r.text
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": [[5]] * 2000, "n": 16, "max_tokens": 1})
    assert r.status_code == 400 and "32000 sequences" in r.json()["error"]["message"], r.text
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                         "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": deep}}})
    assert r.status_code == 400 and "nests deeper than 32" in r.json()["error"]["message"], r.text
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "guided_regex": "a" * 70_000})
    assert r.status_code == 400 and "at most 65,536" in r.json()["error"]["message"], r.text

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "tags": {
        "type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}}, "required": ["color", "tags"],
     "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                                                 "y": {"type": "boolean"}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "label": {"enum": ["p", "q"]}}, "required": ["point"], "additionalProperties": False},
]


def test_json_schema_outputs_validate_under_batching_with_free_requests(client):
    def constrained(i):
        schema = SCHEMAS[i % len(SCHEMAS)]
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"answer {i}"}], max_tokens=120, temperature=1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        return r.choices[0].finish_reason

    def free(i):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12 + i, temperature=0).choices[0].text

    alone = [free(i) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        frees = [pool.submit(free, i) for i in range(3)]
        finishes = list(pool.map(constrained, range(6)))
        assert [f.result() for f in frees] == alone  # sharing steps with constrained requests changes nothing for the free
    assert set(finishes) == {"stop"}

    obj = client.completions.create(model=MODEL, prompt="{", max_tokens=60, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}, "ignore_eos": False})
    if obj.choices[0].finish_reason == "stop":  # JSON mode's free strings may run past max_tokens
        assert isinstance(json.loads(obj.choices[0].text), dict)
    regex = client.completions.create(model=MODEL, prompt="x", max_tokens=20, extra_body={"guided_regex": r"[0-9]{3}-[a-c]{2}"})
    assert regex.choices[0].finish_reason == "stop" and len(regex.choices[0].text) == 6 and regex.choices[0].text[3] == "-"
    choice = client.completions.create(model=MODEL, prompt="x", max_tokens=10, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}]


def _assemble(chunks) -> tuple[dict, str]:
    """A streamed answer's tool calls (by index) and its finish reason."""
    calls, finish = {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or delta.id
                call["name"] = call["name"] or (delta.function.name if delta.function else None)
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    return calls, finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_are_enforced_and_round_trip_streamed_and_not(client, server, tool_choice):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=80,
                                       temperature=0, parallel_tool_calls=False)  # one call: the tiny model would go on
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls and r.choices[0].message.content is None
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in calls] == ["get_time"]

    streamed, finish = _assemble(client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=80, temperature=0, stream=True,
        parallel_tool_calls=False))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == [(c.function.name, c.function.arguments) for c in calls]
    assert all(c["id"].startswith("call_") for c in streamed.values())
    # the service's relay rebuilds a whole answer from this stream (service.whole): the calls too
    from supercluster.service.whole import WholeAnswer

    rebuilt = WholeAnswer()
    body = {"model": MODEL, "messages": messages, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 80,
            "temperature": 0, "parallel_tool_calls": False, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as resp:
        for event in resp.read().split(b"\n\n"):
            rebuilt.add(event)
    choice = rebuilt.answer(None)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [
        (c.function.name, c.function.arguments) for c in calls]

    # the round trip: the call and its result go back, the model answers in text
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 *({"role": "tool", "tool_call_id": c.id, "content": '{"result": 21}'} for c in calls)]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=5)
    assert answer.choices[0].message.tool_calls is None and answer.usage.prompt_tokens > r.usage.prompt_tokens
    rendered = post(server, "/tokenize", {"messages": messages}).json()["tokens"]
    text = post(server, "/detokenize", {"tokens": rendered}).json()["prompt"]
    assert '{"result": 21}' in text and all(json.dumps(json.loads(c.function.arguments)) in text for c in calls)


def test_tool_choice_none_leaves_tools_out_and_bad_choices_are_refused(client, server):
    with_tools = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "tools": TOOLS, "max_tokens": 1}).json()
    without = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                    "tools": TOOLS, "tool_choice": "none", "max_tokens": 1}).json()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]  # "auto" lists them in the prompt
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=TOOLS, max_tokens=2,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tool_choice="required", max_tokens=2)


def test_auto_tool_calls_are_parsed_from_text_and_streams():
    """What a model that calls tools writes (<tool_call> blocks) becomes OpenAI's tool_calls,
    whole or fed a few characters at a time; text around them stays content."""
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
    content, calls = parse(text, TOOLS, "auto")
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome", "days": 2}
    assert parse('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', TOOLS, "auto") == (
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', [])
    stream, deltas = ToolStream(TOOLS, "auto"), []
    for i in range(0, len(text), 3):
        deltas += stream.feed(text[i:i + 3])
    last, called = stream.finish()
    deltas += last
    assert called and "".join(d.get("content", "") for d in deltas) == "Let me check."
    assert [d["tool_calls"][0]["function"] for d in deltas if "tool_calls" in d] == [
        {"name": "get_weather", "arguments": ""}, {"arguments": calls[0]["function"]["arguments"]}]
    # a template that renders tools itself gets them
    template = ChatTemplate("{% for t in tools %}{{ t.function.name }};{% endfor %}{{ messages[0].content }}", "", "")
    assert template.has_tools and template.render([{"role": "user", "content": "hi"}], tools=TOOLS) == "get_weather;get_time;hi"


def test_incremental_detokenization_equals_decoding_the_whole(run_dir):
    """Text streamed one token at a time (a character's first bytes held until its last comes)
    adds up to the whole output decoded at once, and each token's own bytes to its text."""
    from tokenizers import Tokenizer

    from supercluster.serve.tokens import Detokenizer, TokenText

    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    text = "def naïve(x):\n    return '中文 ünïcödé' + x  # ✓\n"
    prompt, ids = tokenizer.encode("x = 1\n").ids, tokenizer.encode(text).ids
    stream = Detokenizer(tokenizer, prompt)
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text and not any("\ufffd" in p for p in pieces)
    names = TokenText(tokenizer)
    assert b"".join(names.bytes(i) for i in ids) == text.encode()
    assert all(names.text(i) == names.bytes(i).decode("utf-8", "backslashreplace") for i in ids)


def test_a_conversation_the_chat_template_refuses_is_a_400_naming_its_message(run_dir, tmp_path):
    """A template's raise_exception (Gemma's and Mistral's refuse a system turn, or roles out of
    order) reaches the client as a 400 on `messages` with the template's own words, through the
    official client, and the engine goes on answering what the template accepts."""
    import shutil

    from fastapi.testclient import TestClient

    from supercluster.data.chat import TEMPLATE_FILE
    from supercluster.serve.api import create_app
    from supercluster.serve.engine import Engine, EngineConfig

    run = shutil.copytree(run_dir, tmp_path / MODEL)
    (run / TEMPLATE_FILE).write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    engine = Engine(run, EngineConfig(precision="fp32", num_blocks=16))
    try:
        with TestClient(create_app(engine)) as http:
            oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
            with pytest.raises(openai.BadRequestError) as refused:
                oai.chat.completions.create(model=MODEL, max_tokens=2, messages=[
                    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
            error = refused.value.body
            assert error["param"] == "messages" and "the chat template refuses it: System role not supported" in error["message"]
            answer = oai.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
            assert answer.choices[0].finish_reason in ("length", "stop")
    finally:
        engine.shutdown()
