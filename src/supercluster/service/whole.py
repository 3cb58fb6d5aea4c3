"""A whole OpenAI answer rebuilt from the chunks of its stream.

The relay asks an endpoint's model server for a stream even when its caller wants one whole
answer, so that it sees the usage so far with every chunk: a caller that leaves before the end
is charged for the tokens generated until then, as a streamed one is. The answer it rebuilds is
what the model server would have answered whole (the texts, finish reasons and log-probabilities
of each choice, joined; the usage of the last chunk), shaped by the same `serve.answers`.
"""

from __future__ import annotations

import json

from supercluster.serve import answers


class WholeAnswer:
    """Collects a stream's chunks (`add`), then gives the whole answer (`answer`)."""

    def __init__(self):
        self.id = self.model = self.created = None
        self.chat = False
        self.texts: dict[int, str] = {}
        self.finishes: dict[int, str | None] = {}
        self.logprobs: dict[int, list[dict]] = {}
        self.tool_calls: dict[int, dict[int, dict]] = {}  # choice -> call index -> the call, its arguments joined
        self.error: dict | None = None  # an error event of the stream (the engine failed mid-way)

    def add(self, event: bytes) -> None:
        if not event.startswith(b"data: {"):
            return
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            self.error = chunk
            return
        self.id, self.model, self.created = chunk.get("id", self.id), chunk.get("model", self.model), chunk.get("created", self.created)
        self.chat = chunk.get("object") == "chat.completion.chunk"
        for choice in chunk.get("choices") or ():
            i = choice.get("index", 0)
            delta = choice.get("delta") or {}
            piece = delta.get("content") if self.chat else choice.get("text")
            self.texts[i] = self.texts.get(i, "") + (piece or "")
            for part in delta.get("tool_calls") or ():  # OpenAI streams a call as id/name, then pieces of arguments
                call = self.tool_calls.setdefault(i, {}).setdefault(part.get("index", 0), {
                    "id": None, "type": "function", "function": {"name": None, "arguments": ""}})
                call["id"] = part.get("id") or call["id"]
                function = part.get("function") or {}
                call["function"]["name"] = function.get("name") or call["function"]["name"]
                call["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason") is not None or i not in self.finishes:
                self.finishes[i] = choice.get("finish_reason")
            if choice.get("logprobs"):
                self.logprobs.setdefault(i, []).append(choice["logprobs"])

    def answer(self, usage: dict | None) -> dict:
        choices = [answers.choice(i, self.chat, self.texts[i], self.logprobs.get(i, []), self.finishes[i],
                                  [calls[k] for k in sorted(calls)] if self.chat and (calls := self.tool_calls.get(i)) else None)
                   for i in sorted(self.texts)]
        return answers.answer(self.id, self.chat, self.created, self.model, choices, usage)
