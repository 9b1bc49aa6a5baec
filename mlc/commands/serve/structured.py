"""Structured output: response_format json_object / json_schema enforced by constrained decoding.

Why llguidance: it runs on CPU in Rust with no GPU code, it compiles a JSON schema lazily (an
Earley parser over a lexer, so it needs no ahead-of-time automaton per schema and starts in about a
millisecond), it computes a token mask for a 49k vocabulary in well under a millisecond, it supports
the most of JSON Schema among the candidates, and it is what vLLM, SGLang, llama.cpp and
transformers use or offer. xgrammar is also fast but compiles each schema ahead of time (slow for
large schemas on a 2-core machine) and its CPU path is secondary; outlines-core builds a regex DFA
per schema, which explodes on nested schemas and misses parts of JSON Schema.

Speculative decoding (engine.py, speculative.py, draft.py) keeps the grammar: drafts are proposed under it (an
n-gram proposal is cut at its first token the grammar refuses; a draft model samples under the mask of a
GrammarLookahead, a copy of the request's matcher that follows the draft's own tokens), and the served model's row
at each position is masked by the request's matcher after the tokens handed out before it, as in a step without
drafts. The request's matcher only ever consumes tokens that were handed out, so it never needs a rollback.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from mlc.errors import ValidationError


class GrammarFactory:
    """Compiles response formats into llguidance grammars and matchers for one tokenizer."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        import llguidance

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids)

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
        # llguidance's mask is little-endian 32-bit words, bit j of word w for token 32w + j: byte by byte, the low bit
        # first. numpy unpacks it in about 8 us for a 49k vocabulary; torch bit shifts took 600 us (2 ms in inference mode).
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].view(np.bool_))


class GrammarLookahead:
    """The grammar as a draft model's proposal advances it: a copy of a request's matcher that consumes the draft's
    own tokens (the request's matcher itself consumes only the tokens handed out, so a rejected draft costs nothing)."""

    def __init__(self, grammars: GrammarFactory, matcher: Any):
        self.grammars = grammars
        self.matcher = matcher.deep_copy()
        self._mask: torch.Tensor | None = None

    def allowed(self) -> torch.Tensor:
        """The mask of the tokens the grammar accepts after the proposal so far."""
        self._mask = self.grammars.allowed(self.matcher)
        return self._mask

    def take(self, token: int) -> bool:
        """Consume a drawn token if the last mask allows it; False (nothing consumed) if not, e.g. a row with no
        allowed token at all, where a draw returns an arbitrary one."""
        if self._mask is None or not bool(self._mask[token]):
            return False
        self._mask = None
        return self.matcher.consume_token(token)

    def done(self) -> bool:
        """True once the grammar is complete (or broken): a proposal ends there, as the request will."""
        return self.matcher.is_stopped()
