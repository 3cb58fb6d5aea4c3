"""A whole (non-streamed) OpenAI answer, shaped in one place.

Two parts of the project build one: the model server (`serve.api`) from the engine's events, and
the service's relay (`service.whole`) from the chunks of a stream it asked for so as to charge a
caller who leaves early. Both shape it here, so a relayed answer is the model server's own.
"""

from __future__ import annotations

COMPLETION_LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def merge_logprobs(parts: list[dict], chat: bool) -> dict:
    """The log-probabilities of one choice from those of its pieces, in order."""
    if chat:
        return {"content": [c for p in parts for c in p.get("content") or ()]}
    return {key: [v for p in parts for v in p.get(key) or ()] for key in COMPLETION_LOGPROB_KEYS}


def choice(index: int, chat: bool, text: str | None, logprob_parts: list[dict], finish: str | None,
           tool_calls: list[dict] | None = None) -> dict:
    """One choice: a completion's text, or a chat message (with tool calls, the text before them, or None)."""
    logprobs = merge_logprobs(logprob_parts, chat) if logprob_parts else None
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def answer(rid: str, chat: bool, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}
