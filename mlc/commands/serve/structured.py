"""Structured output: response_format json_object / json_schema enforced by constrained decoding.

Why llguidance: it runs on CPU in Rust with no GPU code, it compiles a JSON schema lazily (an
Earley parser over a lexer, so it needs no ahead-of-time automaton per schema and starts in about a
millisecond), it computes a token mask for a 49k vocabulary in well under a millisecond, it supports
the most of JSON Schema among the candidates, and it is what vLLM, SGLang, llama.cpp and
transformers use or offer. xgrammar is also fast but compiles each schema ahead of time (slow for
large schemas on a 2-core machine) and its CPU path is secondary; outlines-core builds a regex DFA
per schema, which explodes on nested schemas and misses parts of JSON Schema.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from mlc.errors import ValidationError


class GrammarFactory:
    """Compiles response formats into llguidance grammars and matchers for one tokenizer."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        import llguidance

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def grammar(self, response_format: dict[str, Any]) -> str | None:
        """The grammar for an OpenAI response_format, or None for plain text; ValidationError if malformed."""
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValidationError(["json_schema must be an object with a 'schema' object"])
            schema = spec.get("schema", {})
        else:
            raise ValidationError([f"type must be text, json_object or json_schema, not {kind!r}"])
        grammar = self._ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        is_error, messages = self._ll.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValidationError([f"the JSON schema is not supported: {messages[0]}"])
        return grammar

    def matcher(self, grammar: str) -> Any:
        return self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)

    def allowed(self, matcher: Any) -> torch.Tensor:
        """Boolean (vocab,) mask of the tokens the grammar accepts next."""
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words[:, None] >> self._shifts) & 1
        return bits.reshape(-1)[: self.vocab_size].bool()
