"""Chat data: OpenAI-style `messages` rendered with a model's own chat template, and the loss
mask that trains the assistant turns only.

The template is Jinja rendered as Hugging Face `transformers` renders it (sandboxed, trimmed
blocks, `messages`, `add_generation_prompt`, `bos_token`, `eos_token`), so a fine-tuned model
sees its conversations exactly as its authors' tooling, and our server, would show them.

Which characters belong to an assistant turn is found by rendering the conversation turn by
turn: the text the template adds for assistant turn i, after the prompt it renders for turn i
(`add_generation_prompt=True`), is that turn's answer. The answer counts up to and including
the template's end-of-turn token (SmolLM2's `<|im_end|>`: a model that never learns to emit it
never stops); what the template writes after it (a newline) opens the next turn and is prompt.
This needs no `{% generation %}` markers in the template, which few models ship, but needs the
template to render every conversation as an extension of its shorter prefixes; one that does
not (e.g. it rewrites earlier turns) is refused in one sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from supercluster.errors import UserError

EOT = "<|endoftext|>"
TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")
# Fields a turn may carry besides role and content, as OpenAI's API sends them: an assistant's
# calls, a tool result's call id, a participant's name.
TURN_FIELDS = {"assistant": {"tool_calls", "name"}, "tool": {"tool_call_id", "name"}, "user": {"name"}, "system": {"name"}}
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # Hermes' form (Qwen, SmolLM3 and others)
# A run trained here has no template of its own: role, then content, one line per turn.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _generation_extension():
    """`{% generation %}...{% endgeneration %}`, which some templates wrap answers in for
    transformers' assistant masks: rendered as its body (the turn-by-turn rule finds the answers)."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


def _raise(message: str):
    raise UserError(f"the chat template refuses it: {message}")


def _tools_system_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t["function"]) for t in tools)
    return (f"You may call these functions:\n<tools>\n{listing}\n</tools>\nTo call one, answer "
            f'{TOOL_CALL_OPEN}{{"name": <name>, "arguments": <arguments object>}}{TOOL_CALL_CLOSE}')


def messages_for_template(messages: list[dict], tools: list[dict] | None, template_has_tools: bool) -> list[dict]:
    """The conversation as the chat template gets it: as sent when the template handles tools
    itself; otherwise with the tools in a system message and calls and results written as text."""
    if template_has_tools:
        out = []
        for m in messages:  # templates expect arguments as objects (HF's convention), clients send JSON text
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": loads_arguments(c["function"]["arguments"])}}
                                         for c in m["tool_calls"]]}
            out.append(m)
        return out
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(f'{TOOL_CALL_OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": loads_arguments(c["function"]["arguments"])})}\n{TOOL_CALL_CLOSE}'
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or "", calls]))})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        prompt = _tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def loads_arguments(arguments: str):
    """A tool call's arguments as an object where they are JSON text (clients send text, templates want objects)."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments



class ChatTemplate:
    def __init__(self, source: str, bos: str, eos: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _generation_extension()])
        env.globals["raise_exception"] = _raise  # Hugging Face templates refuse conversations with it
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise UserError(f"The chat template cannot be read: {err}.") from None
        self.bos, self.eos = bos, eos
        # A template that reads `tools` renders them itself; others get them in a system message.
        self.has_tools = "tools" in source

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The conversation as text; tools (and earlier calls and results) through the template's
        own `tools` where it has them, else in Hermes' form (`messages_for_template`)."""
        import jinja2

        try:
            return self.template.render(messages=messages_for_template(messages, tools, self.has_tools),
                                        add_generation_prompt=add_generation_prompt, bos_token=self.bos,
                                        eos_token=self.eos, tools=tools if self.has_tools else None)
        except jinja2.TemplateError as err:
            raise UserError(f"the chat template fails on this conversation: {err}") from None

    def assistant_spans(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character spans of its assistant turns
        (an assistant's tool calls are its answer too)."""
        text = self.render(messages, add_generation_prompt=False, tools=tools)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools) if i or tools else ""
            upto = self.render(messages[: i + 1], add_generation_prompt=False, tools=tools)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise UserError("The chat template does not render a conversation as an extension of its earlier turns, "
                                "so its assistant turns cannot be told apart for the loss mask; use a model whose template "
                                "does, or plain text data.")
            turn = upto[len(prompt):]
            end = turn.rfind(self.eos) + len(self.eos) if self.eos and self.eos in turn else len(turn.rstrip())
            spans.append((len(prompt), len(prompt) + end))
        return text, spans


def check_messages(messages, where: str = "chat data") -> list[dict]:
    """OpenAI-style turns: a list of {"role": system|user|assistant|tool, "content": str} with at
    least one assistant turn (a conversation without one trains nothing), or one sentence naming
    `where` (the file and line). Assistant turns may carry `tool_calls` (content then may be null),
    tool results their `tool_call_id`, any turn a `name` (TURN_FIELDS); other fields are refused
    rather than dropped."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns.")
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) and m.get("role") == "assistant" else None
        if not isinstance(m, dict) or m.get("role") not in ROLES or not (
                isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise UserError(f"{where}: every turn of 'messages' needs a role ({', '.join(ROLES)}) and a string "
                            f"content; turn {i} is {str(m)[:80]!r}.")
        unknown = set(m) - {"role", "content"} - TURN_FIELDS[m["role"]]
        if unknown:  # images, audio, refusals: not rendered here, so refused rather than dropped
            raise UserError(f"{where}: turn {i} has the field {sorted(unknown)[0]!r}, which a {m['role']} turn of chat "
                            f"data does not support (role, content{''.join(', ' + f for f in sorted(TURN_FIELDS[m['role']]))}).")
        if calls is not None and not (isinstance(calls, list) and calls and all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments", {}), (str, dict)) for c in calls)):
            raise UserError(f"{where}: turn {i}'s tool_calls must be a list of {{type: function, function: {{name, "
                            f"arguments}}}} as OpenAI sends them.")
        out.append({k: v for k, v in m.items() if v is not None} | {"content": m.get("content") or ""})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing would be trained on.")
    return out


def check_tools(tools, where: str = "chat data") -> list[dict] | None:
    """A row's `tools` (OpenAI's function tools the conversation could call), or one sentence."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type", "function") == "function"
                                               and isinstance(t.get("function"), dict)
                                               and isinstance(t["function"].get("name"), str) for t in tools):
        raise UserError(f"{where}: 'tools' must be a list of {{type: function, function: {{name, description, "
                        f"parameters}}}} as OpenAI takes them.")
    return tools


class ChatEncoder:
    """Conversations -> (token ids, loss mask) with a model's tokenizer and chat template."""

    def __init__(self, tokenizer, template: ChatTemplate):
        self.tokenizer, self.template = tokenizer, template

    @classmethod
    def for_run(cls, run_dir: Path) -> "ChatEncoder":
        """The encoder of a run directory (an imported model's tokenizer, specials and template)."""
        from supercluster.data.tokenizer import load_tokenizer

        run_dir = Path(run_dir)
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
        return cls(tokenizer, load_chat(run_dir, tokenizer))

    def encode(self, messages, where: str = "chat data", tools=None) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation (with the `tools` it may call) and, per token, 1
        where it belongs to an assistant turn (its content or calls and end-of-turn token), else 0."""
        text, spans = self.template.assistant_spans(check_messages(messages, where), check_tools(tools, where))
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        mask, k = [], 0
        for start, _ in encoding.offsets:
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            mask.append(int(k < len(spans) and start >= spans[k][0]))
        return list(encoding.ids), mask


class ChatRenderer(ChatEncoder):
    """What `data prepare --format chat` calls for each row: `render_chat(messages)` gives the
    ids and the loss mask as arrays."""

    def __init__(self, tokenizer, template: str | None = None, bos: str = "", eos: str = ""):
        super().__init__(tokenizer, ChatTemplate(template or PLAIN_TEMPLATE, bos, eos))

    def render_chat(self, messages, where: str = "chat data", tools=None) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.encode(messages, where, tools)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def chat_tokens(run_dir: Path, tokenizer) -> tuple[str, str]:
    """The bos and eos token texts a run directory's chat template gets ("" where it has none):
    its special tokens, else <|endoftext|> as eos when the vocabulary has it."""
    from supercluster.data.tokenizer import SPECIAL_TOKENS, load_special_tokens

    specials = load_special_tokens(Path(run_dir) / SPECIAL_TOKENS, tokenizer.get_vocab_size())
    bos = tokenizer.id_to_token(specials["bos"]) if specials.get("bos") is not None else ""
    eos_ids = specials.get("eos") or []
    eos = tokenizer.id_to_token(eos_ids[0]) if eos_ids else (EOT if tokenizer.token_to_id(EOT) is not None else "")
    return bos or "", eos or ""


def load_chat(run_dir: Path, tokenizer) -> ChatTemplate:
    """A run directory's chat template (the plain one when it has none), with its bos and eos tokens."""
    path = Path(run_dir) / TEMPLATE_FILE
    return ChatTemplate(path.read_text(encoding="utf-8") if path.is_file() else PLAIN_TEMPLATE, *chat_tokens(run_dir, tokenizer))
