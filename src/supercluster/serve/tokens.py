"""A run directory's tokenizer, its end-of-sequence ids and its chat template.

The chat template is Jinja rendered as Hugging Face renders it (sandboxed, trimmed blocks,
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`), so an imported model is
prompted exactly as its authors trained it. A run trained here has no template of its own
and gets a plain one (role, then content, per line).
"""

from __future__ import annotations

from pathlib import Path

from supercluster.errors import UserError

EOT = "<|endoftext|>"
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def load_tokenizer_and_specials(run_dir: Path):
    """(tokenizer, end-of-sequence ids) of a run directory."""
    from tokenizers import Tokenizer

    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no tokenizer.json; serving needs text, so train on text or import a model.")
    tokenizer = Tokenizer.from_file(str(path))
    specials = _specials(run_dir, tokenizer)
    eos = set(specials.get("eos") or [])
    if not eos and tokenizer.token_to_id(EOT) is not None:
        eos.add(tokenizer.token_to_id(EOT))
    return tokenizer, eos


def _specials(run_dir: Path, tokenizer) -> dict:
    from supercluster.data.tokenizer import SPECIAL_TOKENS, load_special_tokens

    return load_special_tokens(Path(run_dir) / SPECIAL_TOKENS, tokenizer.get_vocab_size())


class ChatTemplate:
    def __init__(self, source: str, bos: str, eos: str):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.template, self.bos, self.eos = env.from_string(source), bos, eos

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos, eos_token=self.eos)


def load_chat(run_dir: Path, tokenizer) -> ChatTemplate:
    path = Path(run_dir) / "chat_template.jinja"
    specials = _specials(run_dir, tokenizer)
    bos = tokenizer.id_to_token(specials["bos"]) if specials.get("bos") is not None else ""
    eos_ids = specials.get("eos") or []
    eos = tokenizer.id_to_token(eos_ids[0]) if eos_ids else (EOT if tokenizer.token_to_id(EOT) is not None else "")
    return ChatTemplate(path.read_text() if path.is_file() else PLAIN_TEMPLATE, bos or "", eos or "")
