"""What a client asks the engine for (GenerationRequest) and what it gets back, a sequence at a time (SeqEvent).

Their own module so that the engine's helpers (compiling.py) can make requests without importing the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mlc.kernels.sampling import SampleResult, SamplingParams


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    grammar: str | None = None  # an llguidance grammar (structured output)
    adapter: Any = None  # a LoraAdapter (lora.py) applied to this request's tokens, or None for the base model
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class SeqEvent:
    """New output of one sequence (index i of its request) since its previous event."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[SampleResult]
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" once finished
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None  # with finish_reason "error": what went wrong
