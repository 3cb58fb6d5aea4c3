"""The request bodies of the OpenAI-compatible API, as pydantic models.

Every field a body may carry is named here; any other is refused with a 400 naming it
(`extra="forbid"`), so a client never believes it got something the server does not do.
A few fields OpenAI clients send by habit are accepted and ignored, listed in `IGNORED`
with the reason: they change nothing a single-tenant server computes.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from supercluster.serve.structured import Constraint

# Accepted and ignored, with why (README's serving section lists them too).
IGNORED = {
    "user": "an end-user id for the provider's abuse monitoring; usage is counted per API key here",
    "metadata": "tags stored with a response by OpenAI; nothing is stored here",
    "store": "whether OpenAI stores the response; nothing is stored here",
    "service_tier": "OpenAI's processing tier; there is one here",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    # vLLM's: every chunk carries the usage so far (the service's relay counts a stream cut short by it)
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a response_format of type 'json_schema' needs its 'json_schema'")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of them."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Sampling(BaseModel):
    # NaN and infinities are refused, not compared
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
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
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older spellings of structured_outputs
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # accepted and ignored: see IGNORED
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def constraint(self) -> Constraint | None:
        """The output's constraint, from whichever field names it; more than one is refused."""
        found: list[tuple[str, Constraint]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", Constraint("json_object")))
        elif fmt is not None and fmt.type == "json_schema":
            found.append(("response_format", Constraint("json_schema", json.dumps(fmt.json_schema.schema_))))
        so = self.structured_outputs
        for name, value in (("guided_json", self.guided_json), ("structured_outputs.json", so and so.json_)):
            if value is not None:
                found.append((name, Constraint("json_schema", value if isinstance(value, str) else json.dumps(value))))
        for name, kind, value in (("guided_regex", "regex", self.guided_regex), ("guided_grammar", "grammar", self.guided_grammar),
                                  ("structured_outputs.regex", "regex", so and so.regex),
                                  ("structured_outputs.grammar", "grammar", so and so.grammar)):
            if value is not None:
                found.append((name, Constraint(kind, value)))
        for name, value in (("guided_choice", self.guided_choice), ("structured_outputs.choice", so and so.choice)):
            if value is not None:
                found.append((name, Constraint.choice(value)))
        if so is not None and so.json_object:
            found.append(("structured_outputs.json_object", Constraint("json_object")))
        if len(found) > 1:
            raise ValueError(f"give one output constraint, not {' and '.join(name for name, _ in found)}")
        return found[0][1] if found else None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[list[int]] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: the prompt's log-probabilities alone

    @model_validator(mode="after")
    def _prompt_forms(self):
        if isinstance(self.prompt, list) and (not self.prompt or any(isinstance(p, list) and not p for p in self.prompt)):
            raise ValueError("a prompt list needs at least one prompt, and each prompt at least one token")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing; it is allowed with echo, to score the prompt")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]  # image, audio and file parts: this server's models read text only
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # an assistant turn sent back as OpenAI returned it


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tools_fit(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same name")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names '{choice.function.name}', which is not among the tools")
        if (choice == "required" or isinstance(choice, NamedToolChoice)) and self.constraint() is not None:
            raise ValueError("tools and an output constraint cannot be combined")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
