"""Readers of foreign model formats. Each returns an `ImportedModel`: the model's shape, its
weights under this project's parameter names, its tokenizer and its chat conventions;
`serve.importing` writes that down as a run directory."""

from __future__ import annotations

from dataclasses import dataclass, field

from supercluster.model.config import ModelConfig


@dataclass
class ImportedModel:
    model: ModelConfig
    tensors: dict  # our parameter name -> torch tensor (any float dtype; stored as fp32)
    tokenizer_json: str  # Hugging Face `tokenizers` JSON
    chat_template: str | None = None
    bos: int | None = None
    eos: list[int] = field(default_factory=list)
    pad: int | None = None
    name: str = ""  # what the source calls the model, for display
