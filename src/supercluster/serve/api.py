"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

`/v1/completions` (a prompt as a string, a list of strings, a list of ids or a list of id
lists; `echo` with the prompt's log-probabilities) and `/v1/chat/completions` (tools,
structured output), streamed as OpenAI streams them (SSE chunks, `stream_options.include_usage`,
`data: [DONE]`); vLLM's `/tokenize` and `/detokenize`; `/v1/models`, `/health` (open),
`/metrics` (Prometheus). Errors use OpenAI's body, `{"error": {"message", "type", "param",
"code"}}`, so the official clients raise their usual exceptions. A field the server does not
implement is refused by name (serve/protocol.py lists the few accepted and ignored).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from supercluster.errors import UserError
from supercluster.serve import answers
from supercluster.serve import tools as tooling
from supercluster.serve.disconnect import ClientGone, unless_client_leaves
from supercluster.serve.engine import Engine
from supercluster.serve.metrics import ServeMetrics
from supercluster.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    ContentPart,
    DetokenizeRequest,
    NamedToolChoice,
    StreamOptions,
    TokenizeRequest,
    _Sampling,
)
from supercluster.serve.sampling import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _params(body: _Sampling, max_tokens: int, logprobs: int | None, seed_offset: int, constraint) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k),
        min_p=body.min_p, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, constraint=constraint, stop=stop, stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
        seed=None if body.seed is None else body.seed + seed_offset, logprobs=logprobs,
    )


def _text_of(content: str | list[ContentPart] | None) -> str:
    if isinstance(content, list):  # OpenAI's content parts: only text parts carry text
        return "".join(part.text for part in content if part.type == "text")
    return content or ""


# pydantic's names of a union's branches in an error's location ("str", "list[int]", ...): no field of a request
_BRANCH = re.compile(r"^(str|int|float|bool|none|list|dict)$|[\[(]")


def _where(loc: tuple) -> str | None:
    """The field an error is at, as the client wrote it (the location's union branches left out)."""
    return ".".join(str(p) for p in loc[1:] if not (isinstance(p, str) and _BRANCH.search(p))) or None


class _Relay:
    """Carries engine events from its thread to the requests' queues on the event loop. A step
    emits one event per running sequence; they cross in one batch with one wake-up of the loop
    (not one each), so the server thread takes the CPU from the engine's threads less often."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending, self.lock = loop, [], threading.Lock()

    def emitter(self, queue: asyncio.Queue, index: int):
        def emit(event: dict) -> None:
            with self.lock:
                self.pending.append((queue, index, event))
                wake = len(self.pending) == 1
            if wake:
                self.loop.call_soon_threadsafe(self._deliver)
        return emit

    def _deliver(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for queue, index, event in batch:
            queue.put_nowait((index, event))


@dataclass
class _Choice:
    """One choice of a response: its prompt, and what `echo` puts before its output."""

    index: int
    prompt: list[int]
    echo_text: str = ""
    echo_logprobs: list | None = None  # prompt_logprobs' entries, when echo asks for them
    tools: tooling.ToolStream | None = None


def create_app(engine: Engine, api_keys: list[str] | tuple[str, ...] = (), max_queue: int | None = None) -> FastAPI:
    app = FastAPI(title="supercluster serve", version="1")
    metrics = ServeMetrics(engine)
    keys = set(api_keys)
    queue_limit = engine.config.max_queue if max_queue is None else max_queue
    relays: dict[asyncio.AbstractEventLoop, _Relay] = {}  # one per event loop (tests may run several)

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return JSONResponse(error_body(err.message, err.kind, err.code, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        unknown = [e for e in err.errors() if e.get("type") == "extra_forbidden"]
        if unknown:  # a field this server does not implement: refused by name, never ignored
            where = _where(unknown[0].get("loc", ()))
            return JSONResponse(error_body(f"The field '{where}' is not supported by this server.", "invalid_request_error",
                                           "unsupported_field", where), status_code=400)
        # The deepest error is nearest its cause: a content part's bad text, not "content is no string".
        first = max(err.errors(), key=lambda e: len(e.get("loc", ())), default={})
        where = _where(first.get("loc", ()))
        message = f"Invalid request: {first.get('msg', 'malformed body')}" + (f" at '{where}'" if where else "") + "."
        return JSONResponse(error_body(message, "invalid_request_error", param=where), status_code=400)

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in keys:
            raise ApiError(401, "Missing or invalid API key; send it as 'Authorization: Bearer KEY'.",
                           "authentication_error", "invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{engine.name}'.",
                           "invalid_request_error", "model_not_found", "model")

    def admit() -> None:
        if engine.waiting() >= queue_limit:
            raise ApiError(429, f"The server is at capacity ({queue_limit} requests waiting); retry later.",
                           "rate_limit_exceeded", "queue_full")

    def check_sequences(count: int) -> None:
        """One request never asks for more sequences (prompts x n) than the whole queue holds."""
        if count > queue_limit:
            raise ApiError(400, f"This request asks for {count} sequences (prompts x n); this server queues at most "
                           f"{queue_limit}.", param="prompt")

    async def compiled(constraint, param: str):
        if constraint is None:
            return None
        try:  # compiling a new schema takes milliseconds to seconds: off the event loop
            return await asyncio.to_thread(engine.compile, constraint)
        except UserError as err:
            raise ApiError(400, str(err), param=param) from None

    def chat_prompt(messages, tools, add_generation_prompt: bool = True) -> list[int]:
        plain = [{**m.model_dump(exclude_none=True), "content": _text_of(m.content)} for m in messages]
        try:
            text = engine.chat.render(plain, add_generation_prompt=add_generation_prompt, tools=tools)
        except UserError as err:  # the template refused the conversation (its raise_exception)
            raise ApiError(400, str(err), param="messages") from None
        return engine.tokenizer.encode(text, add_special_tokens=False).ids

    @app.get("/health")
    async def health():
        problem = engine.runner.problem()  # e.g. a tensor-parallel rank that died: load balancers look here
        if problem:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "supercluster",
                                            "max_model_len": engine.max_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        authorize(request)
        check_model(body.model)
        if body.messages is not None:
            ids = chat_prompt(body.messages, None, body.add_generation_prompt)
        else:
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens).ids
        out = {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [engine.token_text.text(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        authorize(request)
        check_model(body.model)
        if any(not 0 <= t < engine.cfg.vocab_size for t in body.tokens):
            raise ApiError(400, f"Token ids must be in 0..{engine.cfg.vocab_size - 1}.", param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request)
        check_model(body.model)
        raw = body.prompt if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) else [body.prompt]
        check_sequences(len(raw) * body.n)
        admit()
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        prompts, texts = [], []
        for p in raw:  # every prompt checked (ids, length) before anything is decoded, scored or compiled
            ids = engine.tokenizer.encode(p).ids if isinstance(p, str) else list(p)
            try:
                engine.check_prompt(ids, max_tokens)
            except UserError as err:
                raise ApiError(400, str(err), param="prompt") from None
            prompts.append(ids)
            texts.append(p if isinstance(p, str) or not body.echo else engine.tokenizer.decode(p, skip_special_tokens=False))
        constraint = await compiled(_constraint(body), "response_format")
        choices = []
        for p, (ids, text) in enumerate(zip(prompts, texts)):
            scored = None
            if body.echo and body.logprobs is not None:  # the prompt's own log-probabilities, from one forward pass
                scored = await asyncio.wrap_future(engine.call(lambda ids=ids: engine.prompt_logprobs(ids, body.logprobs)))
            for j in range(body.n):
                choices.append(_Choice(p * body.n + j, ids, text if body.echo else "", scored))
        return await _generate(request, body, choices, max_tokens, body.logprobs, constraint, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        authorize(request)
        check_model(body.model)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        if isinstance(choice, NamedToolChoice):
            choice = choice.model_dump()
        active = tools if choice != "none" else None  # "none": the tools stay out of the prompt
        admit()
        prompt = chat_prompt(body.messages, active)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.room - len(prompt))
        try:  # before compiling a grammar for it
            engine.check_prompt(prompt, max_tokens)
        except UserError as err:
            raise ApiError(400, str(err), param="messages") from None
        constraint = _constraint(body) or (tooling.constraint_for(tools, choice, body.parallel_tool_calls) if active else None)
        constraint = await compiled(constraint, "tool_choice" if body.constraint() is None and active else "response_format")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        choices = [_Choice(j, prompt, tools=tooling.ToolStream(active, choice) if active else None) for j in range(body.n)]
        return await _generate(request, body, choices, max_tokens, logprobs, constraint, chat=True)

    async def _generate(request: Request, body, choices: list[_Choice], max_tokens: int, logprobs, constraint, chat: bool):
        admit()
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        relay = relays.get(loop) or relays.setdefault(loop, _Relay(loop))
        ids = []
        try:
            for c in choices:
                if max_tokens == 0:  # echo alone: nothing to generate
                    events.put_nowait((c.index, {"finish_reason": "length"}))
                    continue
                params = _params(body, max_tokens, logprobs, c.index, constraint)
                ids.append(engine.submit(c.prompt, params, relay.emitter(events, c.index)))
        except UserError as err:
            for rid in ids:
                engine.abort(rid)
            raise ApiError(400, str(err), param="max_tokens") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        prompt_tokens = sum(len(c.prompt) for c in choices if c.index % body.n == 0)  # each prompt once, as vLLM counts
        stream = _Stream(rid, engine.name, chat, choices, prompt_tokens, events, ids, engine)
        if body.stream:
            return StreamingResponse(stream.sse(body.stream_options or StreamOptions()), media_type="text/event-stream")
        return JSONResponse(await stream.whole(request))

    return app


def _constraint(body: _Sampling):
    try:
        return body.constraint()
    except ValueError as err:
        raise ApiError(400, f"Invalid request: {err}.", param="response_format") from None


class _Stream:
    """The events of one API request's choices, as OpenAI's stream chunks or final object."""

    def __init__(self, rid, model, chat, choices: list[_Choice], prompt_tokens, events, ids, engine):
        self.rid, self.model, self.chat, self.prompt_tokens = rid, model, chat, prompt_tokens
        self.choices = {c.index: c for c in choices}
        self.n = len(choices)
        self.events, self.ids, self.engine = events, ids, engine
        self.created = int(time.time())
        self.done = 0
        self.completion_tokens = 0
        self.offsets = {c.index: 0 for c in choices}  # completions' text_offset: characters so far

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _entries(self, index: int, pairs) -> dict:
        """Log-probabilities in the endpoint's form for (token, logprob, top) triples (logprob None: a first prompt token)."""
        text = self.engine.token_text
        if self.chat:
            def entry(t, lp):
                return {"token": text.text(t), "logprob": lp, "bytes": list(text.bytes(t))}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(u, v) for u, v in top or []]} for t, lp, top in pairs]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in pairs:
            out["tokens"].append(text.text(t))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if lp is None else {text.text(u): v for u, v in top or []})
            out["text_offset"].append(self.offsets[index])
            self.offsets[index] += len(text.text(t))
        return out

    def _logprobs(self, index: int, ev: dict):
        return self._entries(index, [(ev["token"], ev["logprob"], ev["top_logprobs"])]) if "logprob" in ev else None

    def _echo_logprobs(self, c: _Choice):
        if c.echo_logprobs is None:
            return None
        return self._entries(c.index, [(t, None, None) if e is None else (t, e[0], e[1])
                                       for t, e in zip(c.prompt, c.echo_logprobs)])

    async def _next(self):
        index, ev = await self.events.get()
        if "error" in ev:
            raise ApiError(500, f"The engine failed: {ev['error']}", "server_error")
        if "token" in ev:  # one event per generated token: the count so far, for continuous usage
            self.completion_tokens += 1
        if "finish_reason" in ev:
            self.done += 1
        return index, ev

    def _chunk(self, choice: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def _chunks(self, index: int, ev: dict, first: bool) -> list[dict]:
        c = self.choices[index]
        finish = ev.get("finish_reason")
        if not self.chat:
            text, lp = ev.get("text", ""), None
            if first and c.echo_text:
                text = c.echo_text + text
                lp = self._echo_logprobs(c)
            own = self._logprobs(index, ev)
            lp = answers.merge_logprobs([x for x in (lp, own) if x], False) if (lp or own) else None
            return [self._chunk({"index": index, "text": text, "logprobs": lp, "finish_reason": finish})]
        role = {"role": "assistant"} if first else {}
        if c.tools is None:
            delta = {} if finish else {**role, "content": ev.get("text", "")}
            return [self._chunk({"index": index, "delta": delta, "logprobs": self._logprobs(index, ev), "finish_reason": finish})]
        if not finish:
            deltas = c.tools.feed(ev.get("text", ""))
            return [self._chunk({"index": index, "delta": {**(role if k == 0 else {}), **d}, "logprobs": None,
                                 "finish_reason": None}) for k, d in enumerate(deltas)]
        deltas, called = c.tools.finish()
        chunks = [self._chunk({"index": index, "delta": {**(role if k == 0 else {}), **d}, "logprobs": None, "finish_reason": None})
                  for k, d in enumerate(deltas)]
        reason = "tool_calls" if called and finish == "stop" else finish
        return chunks + [self._chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})]

    async def sse(self, options: StreamOptions):
        started, continuous = set(), options.include_usage and options.continuous_usage_stats
        try:
            while self.done < self.n:
                try:
                    index, ev = await self._next()
                except ApiError as err:  # the engine failed mid-stream: said in OpenAI's error body, then ended
                    yield f"data: {json.dumps(error_body(err.message, err.kind, err.code, err.param))}\n\n"
                    break
                chunks = self._chunks(index, ev, index not in started)
                if chunks:
                    started.add(index)
                if continuous and not chunks:  # every token's usage is seen, even one the tools held back
                    chunks = [{**self._chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": None})}]
                for chunk in chunks:
                    if continuous:
                        chunk["usage"] = self._usage()
                    yield f"data: {json.dumps(chunk)}\n\n"
            else:
                if options.include_usage:
                    usage = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                             "created": self.created, "model": self.model, "choices": [], "usage": self._usage()}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): nothing of this request keeps running
            for rid in self.ids:
                self.engine.abort(rid)

    async def whole(self, request: Request) -> dict:
        """The final object; {} (sent to nobody) when the client left first, its sequences aborted."""
        try:
            return await unless_client_leaves(request, self._gather())
        except ClientGone:
            return {}
        finally:  # done, failed or abandoned: nothing of this request keeps running
            for rid in self.ids:
                self.engine.abort(rid)

    async def _gather(self) -> dict:
        texts = {i: c.echo_text for i, c in self.choices.items()}
        finishes = dict.fromkeys(self.choices)
        logprobs = {i: [lp] if (lp := self._echo_logprobs(c)) else [] for i, c in self.choices.items()}
        while self.done < self.n:
            index, ev = await self._next()
            texts[index] += ev.get("text", "")
            finishes[index] = ev.get("finish_reason", finishes[index])
            if "logprob" in ev:
                logprobs[index].append(self._logprobs(index, ev))
        choices = []
        for i in sorted(self.choices):
            text, finish, calls, c = texts[i], finishes[i], None, self.choices[i]
            if self.chat and c.tools is not None:
                text, calls = tooling.parse(texts[i], c.tools.tools, c.tools.choice)
                finish = "tool_calls" if calls and finish == "stop" else finish
            choices.append(answers.choice(i, self.chat, text, logprobs[i], finish, calls))
        return answers.answer(self.rid, self.chat, self.created, self.model, choices, self._usage())
