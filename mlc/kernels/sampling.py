"""Next-token selection for a batch of sequences, each with its own sampling parameters.

Order of operations (the one vLLM and transformers use): repetition penalty (prompt and output
tokens), presence and frequency penalties (output tokens), logit_bias, the grammar mask, then
greedy argmax or temperature, top_k, top_p, min_p and a random draw. Logprobs are those of the raw
model distribution (log_softmax of the unprocessed logits), as OpenAI reports them.

Each sequence draws from its own torch.Generator, exactly one draw of `vocab` exponentials per
sampled token (the Gumbel/exponential race: argmax p_i / E_i is a sample from p). A seeded request
therefore gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class SampleResult:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token, logprob), most likely first


class SequenceSampler:
    """One sequence's sampling state: its parameters, random stream and token counts for penalties."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: list[int], index: int = 0):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        # Sibling samples of one request (n > 1) get distinct streams derived from the request's seed.
        self.generator = torch.Generator().manual_seed((seed ^ (index * GOLDEN)) % (1 << 63))
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        if params.penalised:
            self.counts = torch.zeros(vocab_size)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt:
                self.seen[torch.tensor(prompt)] = True
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = list(params.logit_bias)
            self.bias = (torch.tensor(ids), torch.tensor([params.logit_bias[i] for i in ids], dtype=torch.float32))

    def record(self, token: int) -> None:
        """Count a generated token for the penalties."""
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


def process_row(row: torch.Tensor, s: SequenceSampler, allowed: torch.Tensor | None) -> None:
    """Apply penalties, bias and the grammar mask to one row of logits, in place."""
    p = s.params
    if s.counts is not None:
        if p.repetition_penalty != 1.0:
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(s.seen, penalised, row))
        if p.frequency_penalty or p.presence_penalty:
            row -= p.frequency_penalty * s.counts + p.presence_penalty * (s.counts > 0).float()
    if s.bias is not None:
        row.index_add_(0, s.bias[0], s.bias[1])
    if allowed is not None:
        row.masked_fill_(~allowed, float("-inf"))


def _draw(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """A random token from one processed row under temperature, top_k, top_p and min_p."""
    probs = distribution(row, p)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise))


def distribution(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The probabilities a non-greedy draw uses: one processed row under temperature, top_k, top_p and min_p."""
    logits = row / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p: drop tokens whose preceding mass already does.
        drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= p.top_p
        probs = probs.index_fill(0, order[drop], 0.0)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0 or p.min_p > 0.0:
        probs = probs / probs.sum()
    return probs


def sample(
    logits: torch.Tensor, samplers: list[SequenceSampler], allowed: list[torch.Tensor | None] | None = None
) -> list[SampleResult]:
    """One token for each row of logits (rows, vocab), with each row's own parameters and grammar mask."""
    allowed = allowed or [None] * len(samplers)
    logits = logits.float()  # (also for greedy rows: torch's argmax of 49152 bf16 values took 349 us, of their fp32 copy 62)
    want_logprobs = [s.params.logprobs is not None for s in samplers]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    needs_processing = [s.counts is not None or s.bias is not None or a is not None for s, a in zip(samplers, allowed)]
    if any(needs_processing):
        logits = logits.clone()
        for i, s in enumerate(samplers):
            if needs_processing[i]:
                process_row(logits[i], s, allowed[i])
    greedy = [s.params.greedy for s in samplers]
    tokens = [0] * len(samplers)
    if any(greedy):
        best = torch.argmax(logits, dim=-1).tolist()
        tokens = [best[i] if greedy[i] else 0 for i in range(len(samplers))]
    for i, s in enumerate(samplers):
        if not greedy[i]:
            tokens[i] = _draw(logits[i], s.params, s.generator)
    results = []
    for i, s in enumerate(samplers):
        r = SampleResult(tokens[i])
        if raw_logprobs is not None and want_logprobs[i]:
            r.logprob = float(raw_logprobs[i, tokens[i]])
            k = s.params.logprobs
            if k:
                values, ids = torch.topk(raw_logprobs[i], k)
                r.top = list(zip(ids.tolist(), values.tolist()))
        s.record(tokens[i])
        results.append(r)
    return results
