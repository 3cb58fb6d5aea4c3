"""Chat rows -> token ids and a loss mask that covers the assistant turns only.

`ChatRenderer(tokenizer, template, bos, eos).render_chat(messages)` is the hook that
`data prepare --format chat` calls for each row. The conversation is rendered whole with the
model's own chat template; an assistant turn's text is what rendering the turns up to it
adds after the generation prompt of the turns before it, and a token is a target when its
characters lie inside such a span.
"""

from __future__ import annotations

import numpy as np

from supercluster.errors import UserError

# A run trained here has no template of its own: role, then content, per line (serve uses the same).
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ROLES = {"system", "user", "assistant", "tool"}


def check_messages(messages, where: str) -> list[dict]:
    """OpenAI-style turns, or one sentence naming `where` (file and line)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns.")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise UserError(f"{where}: every turn of 'messages' needs a role ({', '.join(sorted(ROLES))}) and a "
                            f"string content, got {str(turn)[:80]!r}.")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing would be trained on.")
    return messages


def _raise(message: str):
    raise UserError(f"the chat template refuses it: {message}")


class ChatRenderer:
    def __init__(self, tokenizer, template: str | None = None, bos: str = "", eos: str = ""):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        import jinja2

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise  # Hugging Face templates refuse conversations with it
        self.tokenizer = tokenizer
        try:
            self.template = env.from_string(template or PLAIN_TEMPLATE)
        except jinja2.TemplateError as err:
            raise UserError(f"The chat template cannot be read: {err}.") from None
        self.bos, self.eos = bos, eos

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos, eos_token=self.eos)
        except jinja2.TemplateError as err:
            raise UserError(f"the chat template fails on this conversation: {err}") from None

    def render_chat(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss_mask): the rendered conversation's ids, and 1 on the assistant turns' tokens."""
        text = self.render(messages, add_generation_prompt=False)
        spans = []
        for k, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            start = len(self.render(messages[:k], add_generation_prompt=True))
            end = len(self.render(messages[: k + 1], add_generation_prompt=False))
            spans.append((start, end))
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        starts = np.asarray([s for s, _ in encoding.offsets]) if len(ids) else np.zeros(0, int)
        for start, end in spans:
            mask[(starts >= start) & (starts < end)] = 1
        return ids, mask
