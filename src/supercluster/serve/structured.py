"""Structured output: a request's constraint (JSON, a JSON Schema, a regular expression, an EBNF
grammar or a choice of strings) compiled to a grammar, and each step's token masks.

Built on xgrammar, chosen by measuring the cost of one token's mask on this CPU (see
`bench/structured_mask.py`): 1.5-7 us a token for JSON Schemas, against 11-15 us for
llguidance and a 12 s compile of a schema for outlines-core. A grammar is compiled once per
constraint (xgrammar's compiler caches by its source, up to CACHE_BYTES) and each sequence walks it with its own
matcher. The masks of a step's constrained rows are filled together and applied to the batch's
logits in place, so constrained and free requests share a forward pass and a sampling step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from supercluster.errors import UserError

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
MAX_SOURCE_CHARS = 64 * 1024  # a schema, pattern or grammar beyond this is refused before compiling
MAX_SCHEMA_DEPTH = 32  # nesting of a JSON Schema (compile time grows with it; 400 deep took 4 s)
CACHE_BYTES = 256 * 2**20  # compiled grammars kept (xgrammar's cache, by source; least recently used go)


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match; `source` is the schema (JSON text), pattern or grammar."""

    kind: str
    source: str = ""

    @staticmethod
    def choice(options: list[str]) -> Constraint:
        return Constraint("choice", json.dumps(list(options)))


def _bounded_strings(node, depth: int = 0):
    """The schema with each length-bounded string given an equivalent pattern: xgrammar 0.2.9
    lets a string with minLength or maxLength (and no pattern) hold raw control characters,
    which JSON forbids, so the output would not parse. (Such a string then holds no escapes.)"""
    if depth > MAX_SCHEMA_DEPTH:
        raise UserError(f"The JSON Schema nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it.")
    if isinstance(node, list):
        return [_bounded_strings(n, depth + 1) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _bounded_strings(v, depth + 1) for k, v in node.items()}
    bounded = "minLength" in node or "maxLength" in node
    if node.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & node.keys():
        node["pattern"] = f"^[^\\x00-\\x1f]{{{node.get('minLength', 0)},{node.get('maxLength', '')}}}$"
    return node


class Grammars:
    """One compiler for an engine's tokenizer; it caches compiled grammars by source, bounded."""

    def __init__(self, token_text, stop_ids: set[int]):
        import xgrammar as xgr

        self.xgr = xgr
        # Each token's raw bytes: the library needs no knowledge of the tokenizer's own symbols.
        self.info = xgr.TokenizerInfo(token_text.vocabulary(), xgr.VocabType.RAW, vocab_size=token_text.vocab_size,
                                      stop_token_ids=sorted(stop_ids) or None)
        self.vocab_size = token_text.vocab_size
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=True, cache_limit_bytes=CACHE_BYTES)
        self._bitmask: torch.Tensor | None = None  # used by the engine's thread alone

    def compile(self, constraint: Constraint):
        """The compiled grammar; a constraint the library refuses is a UserError naming why."""
        if len(constraint.source) > MAX_SOURCE_CHARS:
            raise UserError(f"The {constraint.kind.replace('_', ' ')} constraint is {len(constraint.source):,} characters; "
                            f"this server compiles at most {MAX_SOURCE_CHARS:,}.")
        try:
            return self._compile(constraint)
        except UserError:
            raise
        except Exception as err:  # the library's parse errors: the client's schema, pattern or grammar
            why = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(err).strip()).rstrip(".")
            raise UserError(f"The {constraint.kind.replace('_', ' ')} constraint cannot be compiled: {why}.") from None

    def _compile(self, c: Constraint):
        if c.kind == "json_object":
            return self.compiler.compile_builtin_json_grammar()
        if c.kind == "json_schema":
            # Compact JSON (no free whitespace): a model cannot stall the answer in blanks.
            schema = _bounded_strings(json.loads(c.source))
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        if c.kind == "regex":
            return self.compiler.compile_regex(c.source)
        if c.kind == "grammar":
            return self.compiler.compile_grammar(c.source)
        if c.kind == "choice":
            options = json.loads(c.source)
            if not options:
                raise UserError("A choice constraint needs at least one string.")
            return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
        raise UserError(f"Unknown constraint kind {c.kind!r}; use one of {', '.join(KINDS)}.")

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, object]]) -> None:
        """Forbid, in place, every token that would leave each (row, matcher)'s grammar: each
        row's mask filled into one bitmask kept between steps, applied to the rows at once."""
        if self._bitmask is None or self._bitmask.shape[0] < logits.shape[0]:
            self._bitmask = self.xgr.allocate_token_bitmask(max(logits.shape[0], 8), self.vocab_size)
        for i, matcher in rows:
            matcher.fill_next_token_bitmask(self._bitmask, i)
        self.xgr.apply_token_bitmask_inplace(logits, self._bitmask[:logits.shape[0]], vocab_size=self.vocab_size,
                                             indices=[i for i, _ in rows])
