"""Tool calling: tools put in the prompt, the model's calls read back as OpenAI's `tool_calls`.

The tools go through the model's own chat template (its `tools` variable) when it has one;
a template without tools support gets them in a Hermes-style system message instead, and
previous calls and results are written back in that same form (`data/chat.py`, which renders
training conversations with tools the same way). A model answers a call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen, SmolLM3 and others).

`tool_choice`: "auto" (the default with tools) lets the model choose; "none" leaves the tools
out; "required" and a named function are enforced with structured output (serve/structured.py):
"required" constrains the answer to a JSON list of calls to the given tools, a named function
to that function's arguments.
"""

from __future__ import annotations

import json
import uuid

from supercluster.data.chat import TOOL_CALL_CLOSE as CLOSE
from supercluster.data.chat import TOOL_CALL_OPEN as OPEN
from supercluster.data.chat import loads_arguments as _loads
from supercluster.serve.structured import Constraint


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def constraint_for(tools: list[dict], choice, parallel: bool) -> Constraint | None:
    """The structured-output constraint that enforces `required` or a named function (None otherwise)."""
    if isinstance(choice, dict):  # a named function: its arguments
        function = next(t["function"] for t in tools if t["function"]["name"] == choice["function"]["name"])
        return Constraint("json_schema", json.dumps(function.get("parameters") or {"type": "object"}))
    if choice == "required":
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": t["function"]["name"]},
                                 "arguments": t["function"].get("parameters") or {"type": "object"}}} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not parallel:
            schema["maxItems"] = 1
        return Constraint("json_schema", json.dumps(schema))
    return None


def _call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def parse(text: str, tools: list[dict], choice) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished answer. A call that does not parse, or names no
    given tool, stays in the content as the model wrote it."""
    names = {t["function"]["name"] for t in tools}
    if isinstance(choice, dict):
        return None, [_call(choice["function"]["name"], text)]
    if choice == "required":
        try:
            return None, [_call(c["name"], c["arguments"]) for c in json.loads(text)]
        except (ValueError, TypeError, KeyError):  # cut short by max_tokens: no whole call
            return text or None, []
    calls, content, rest = [], [], text
    while OPEN in rest:
        before, _, after = rest.partition(OPEN)
        body, closed, rest = after.partition(CLOSE)
        found = _loads(body.strip())
        if isinstance(found, dict) and found.get("name") in names and "arguments" in found:
            content.append(before)
            calls.append(_call(found["name"], found["arguments"]))
        else:
            content.append(before + OPEN + body + closed)
    content.append(rest)
    joined = "".join(content).strip() if calls else "".join(content)
    return joined or None, calls


class ToolStream:
    """One choice's streamed deltas with tools: content while it cannot be the start of a call,
    then the calls as OpenAI streams them (a delta with the call's index, id, type and name, then
    its arguments). A named function's arguments stream as they come."""

    def __init__(self, tools: list[dict], choice):
        self.tools, self.choice = tools, choice
        self.text, self.sent, self.called = "", 0, False  # sent: characters emitted as content

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if isinstance(self.choice, dict):
            deltas = []
            if not self.called:
                self.called = True
                deltas.append({"tool_calls": [{"index": 0, "id": call_id(), "type": "function",
                                               "function": {"name": self.choice["function"]["name"], "arguments": ""}}]})
            if piece:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            return deltas
        if self.choice == "required":
            return []
        start = self.text.find(OPEN)
        if start < 0:  # hold back a tail that could be the start of "<tool_call>"
            start = next((i for i in range(max(self.sent, len(self.text) - len(OPEN) + 1), len(self.text))
                          if OPEN.startswith(self.text[i:])), len(self.text))
        if start > self.sent:
            out, self.sent = self.text[self.sent:start], start
            return [{"content": out}]
        return []

    def finish(self) -> tuple[list[dict], bool]:
        """The last deltas, and whether any call was made."""
        if isinstance(self.choice, dict):
            return self.feed("") if not self.called else [], True
        content, calls = parse(self.text[self.sent:], self.tools, self.choice)
        deltas = [{"content": content}] if content else []
        for i, c in enumerate(calls):
            deltas.append({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                           "function": {"name": c["function"]["name"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": c["function"]["arguments"]}}]})
        return deltas, bool(calls)
