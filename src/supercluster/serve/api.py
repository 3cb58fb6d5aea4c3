"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

`/v1/completions` and `/v1/chat/completions` (streamed as OpenAI streams them: SSE chunks,
`stream_options.include_usage`, `data: [DONE]`), `/v1/models`, `/health` (open), `/metrics`
(Prometheus). Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`,
so the official clients raise their usual exceptions. Fields OpenAI or vLLM clients commonly
send that this engine does not use are accepted and ignored rather than refused.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from supercluster.errors import UserError
from supercluster.serve.disconnect import ClientGone, unless_client_leaves
from supercluster.serve.engine import Engine
from supercluster.serve.metrics import ServeMetrics
from supercluster.serve.sampling import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False
    # vLLM's: every chunk carries the usage so far (the service's relay counts a stream cut short by it)
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    # ignore_eos, repetition_penalty, user, ...: accepted; NaN and infinities are refused, not compared
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # OpenAI's: an int64
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url, input_audio, ...: accepted; only text parts are read
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a content part of type 'text' needs a string 'text'")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def _params(body: _Sampling, max_tokens: int, logprobs: int | None, seed_offset: int) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k),
        min_p=body.min_p, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        stop=stop, stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
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

    def check_model(name: str) -> None:
        if name != engine.name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{engine.name}'.",
                           "invalid_request_error", "model_not_found", "model")

    def admit() -> None:
        if engine.waiting() >= queue_limit:
            raise ApiError(429, f"The server is at capacity ({queue_limit} requests waiting); retry later.",
                           "rate_limit_exceeded", "queue_full")

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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request)
        check_model(body.model)
        prompt = body.prompt if isinstance(body.prompt, list) else engine.tokenizer.encode(body.prompt).ids
        return await _generate(request, body, prompt, body.max_tokens or 16, body.logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        authorize(request)
        check_model(body.model)
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
        text = engine.chat.render(messages, add_generation_prompt=True)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False).ids
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.room - len(prompt))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _generate(request, body, prompt, max_tokens, logprobs, chat=True)

    async def _generate(request: Request, body, prompt: list[int], max_tokens: int, logprobs, chat: bool):
        admit()
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        relay = relays.get(loop) or relays.setdefault(loop, _Relay(loop))
        ids = []
        try:
            for i in range(body.n):
                params = _params(body, max_tokens, logprobs, i)
                ids.append(engine.submit(prompt, params, relay.emitter(events, i)))
        except UserError as err:
            for rid in ids:
                engine.abort(rid)
            raise ApiError(400, str(err), param="max_tokens") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        stream = _Stream(rid, engine.name, chat, body.n, len(prompt), events, ids, engine)
        if body.stream:
            return StreamingResponse(stream.sse(body.stream_options or StreamOptions()), media_type="text/event-stream")
        return JSONResponse(await stream.whole(request))

    return app


class _Stream:
    """The events of one API request's n sequences, as OpenAI's stream chunks or final object."""

    def __init__(self, rid, model, chat, n, prompt_tokens, events, ids, engine):
        self.rid, self.model, self.chat, self.n, self.prompt_tokens = rid, model, chat, n, prompt_tokens
        self.events, self.ids, self.engine = events, ids, engine
        self.created = int(time.time())
        self.done = 0
        self.completion_tokens = 0

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _logprobs(self, ev: dict):
        if "logprob" not in ev:
            return None
        token = self.engine.tokenizer.id_to_token(ev["token"]) or ""
        top = [{"token": self.engine.tokenizer.id_to_token(t) or "", "logprob": lp} for t, lp in ev["top_logprobs"] or []]
        if self.chat:
            return {"content": [{"token": token, "logprob": ev["logprob"], "bytes": list(token.encode()), "top_logprobs": top}]}
        return {"tokens": [token], "token_logprobs": [ev["logprob"]], "top_logprobs": [{t["token"]: t["logprob"] for t in top}],
                "text_offset": [0]}

    async def _next(self):
        index, ev = await self.events.get()
        if "error" in ev:
            raise ApiError(500, f"The engine failed: {ev['error']}", "server_error")
        if "token" in ev:  # one event per generated token: the count so far, for continuous usage
            self.completion_tokens += 1
        if "finish_reason" in ev:
            self.done += 1
        return index, ev

    def _chunk(self, index: int, ev: dict, first: bool) -> dict:
        finish = ev.get("finish_reason")
        if self.chat:
            delta = {"role": "assistant", "content": ev.get("text", "")} if first else {"content": ev.get("text", "")}
            if finish:
                delta = {}
            choice = {"index": index, "delta": delta, "logprobs": self._logprobs(ev), "finish_reason": finish}
            return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [choice]}
        choice = {"index": index, "text": ev.get("text", ""), "logprobs": self._logprobs(ev), "finish_reason": finish}
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model, "choices": [choice]}

    async def sse(self, options: StreamOptions):
        started, continuous = set(), options.include_usage and options.continuous_usage_stats
        try:
            while self.done < self.n:
                try:
                    index, ev = await self._next()
                except ApiError as err:  # the engine failed mid-stream: said in OpenAI's error body, then ended
                    yield f"data: {json.dumps(error_body(err.message, err.kind, err.code, err.param))}\n\n"
                    break
                chunk = self._chunk(index, ev, index not in started)
                if continuous:
                    chunk["usage"] = self._usage()
                yield f"data: {json.dumps(chunk)}\n\n"
                started.add(index)
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
        texts, finishes, logprobs = [""] * self.n, [None] * self.n, [[] for _ in range(self.n)]
        while self.done < self.n:
            index, ev = await self._next()
            texts[index] += ev.get("text", "")
            finishes[index] = ev.get("finish_reason", finishes[index])
            if "logprob" in ev:
                logprobs[index].append(self._logprobs(ev))
        choices = []
        for i in range(self.n):
            lp = _merge_logprobs(logprobs[i], self.chat) if logprobs[i] else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lp,
                                "finish_reason": finishes[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finishes[i]})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": self._usage()}


def _merge_logprobs(parts: list[dict], chat: bool) -> dict:
    if chat:
        return {"content": [c for p in parts for c in p["content"]]}
    return {key: [v for p in parts for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
