"""Speculative decoding with a draft model: a smaller model of the same vocabulary proposes tokens, the served (target)
model checks them all in one step, and rejection sampling keeps every output token distributed exactly as the target's.

The algorithm is Leviathan et al. 2023 (arXiv 2211.17192) and Chen et al. 2023 (arXiv 2302.01318). Each engine step,
for every decoding sequence with room for K drafts:
1. the draft runs K times, batched over the sequences (its first call also runs the tokens it has not seen: the last
   step's accepted tokens, or the whole prompt the first time), and draws d_1..d_K from its distributions q_1..q_K;
2. the engine runs the target once on the last token and the K drafts, which gives p_1..p_{K+1};
3. position i keeps d_i with probability min(1, p_i(d_i) / q_i(d_i)); the first position that rejects gets a token
   drawn from norm(max(0, p_i - q_i)) instead and ends the step; when all K are kept, position K+1 adds a token from
   p_{K+1} (the bonus token).
p and q are the distributions the request samples from (its penalties, logit_bias, grammar mask, temperature, top_k,
top_p and min_p applied to each model's logits), so each token follows the target's sampling distribution exactly.
A request with a grammar (structured.py) draws its drafts under the mask of a GrammarLookahead that follows the
draft's own tokens, and q_i and p_i are masked alike (both by the grammar after the same tokens, since position i is
decided only while every draft before it was kept); a proposal ends early where the grammar is complete. For a greedy
request both are point masses: d_i is kept when it is the target's argmax, and a rejected position gets the target's
argmax, so greedy output is the output without a draft. Logprobs are the target's, from its own logits, as without one.

Random numbers: position t of a sequence draws from a generator seeded by (the sequence's seed, t, what for), never
from a stream shared by positions. A token is then a function of its context and of (seed, t) alone, so a seeded
request gives the same tokens whatever shares its batch and however many drafts each step had room for. To keep
that true at the bonus position, a seeded sampled request decides it by the same rule, with a draft token drawn from
q_{K+1} (one more draft call, for those sequences only; its keys and values are the ones the next step would compute
anyway) instead of drawing from p_{K+1} directly: the distribution is p_{K+1} either way. The tokens are not those of
the same seed without a draft (the random numbers are used differently); greedy output is.

The draft's keys and values live in a PagedKVStore of its own with the target's number of blocks, addressed through
the target's block tables (seq.blocks): allocating, reserving, preempting and freeing blocks covers both caches, and
a rejected draft is rolled back by counting, as the target's is (Sequence.num_draft_computed beside num_computed).
A sequence that starts on blocks from the prefix cache runs its whole prompt through the draft (the draft's half of
a cached block was not necessarily written), which rewrites shared blocks with the same values. The draft's own
calls are not counted in --max-batched-tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError
from mlc.kernels.paged_attention import PagedBatch, PagedKVStore, Segment
from mlc.kernels.sampling import SampleResult, SequenceSampler, distribution, process_row

# Odd 64-bit constants (Weyl sequence and splitmix64 multipliers) that spread (seed, position, purpose) over seeds.
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
DRAW, DECIDE = 0, 1  # what a position's generator is for: the draft's token, or the target's accept/resample


@dataclass
class Proposal:
    """One sequence's draft tokens for a step and the distributions q they were drawn from (None for greedy)."""

    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor | None] = field(default_factory=list)
    start: int = 0  # the position of the first draft token (len(seq.tokens) when proposed)
    bonus_from_draft: bool = False  # decide position K+1 by the rule with the draft's q there (seeded sampling)


def activation_dtype(model: Any) -> torch.dtype:
    """The dtype of a model's activations and KV cache (bf16 for quantised weights)."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def kv_bytes_per_block(model: Any, block_size: int) -> int:
    """Bytes one KV block of the draft model takes (added to the target's when the cache is sized)."""
    mc = model.config
    return PagedKVStore.bytes_per_block(mc.num_hidden_layers, block_size, mc.num_key_value_heads, mc.head_dim, activation_dtype(model))


def seeded_sampling(sampler: SequenceSampler) -> bool:
    return sampler.params.seed is not None and not sampler.params.greedy


class DraftModel:
    """The draft model, its paged KV cache (over the target's block tables) and its half of the sampling rule."""

    def __init__(self, model: Any, num_blocks: int, block_size: int):
        self.model = model
        mc = model.config
        self.store = PagedKVStore(mc.num_hidden_layers, num_blocks, block_size, mc.num_key_value_heads, mc.head_dim, activation_dtype(model))
        self.generator = torch.Generator()

    def logits(self, items: list[tuple[Any, list[int]]]) -> torch.Tensor:
        """fp32 draft logits, one row per (sequence, extra tokens), after the sequence's tokens followed by the extras.

        Runs only the tokens the draft's cache lacks (from seq.num_draft_computed on) and counts them there.
        """
        pending = []
        for seq, extra in items:
            done, known = seq.num_draft_computed, len(seq.tokens)
            pending.append(seq.tokens[done:] + extra if done < known else extra[done - known :])
        order = sorted(range(len(items)), key=lambda i: len(pending[i]) != 1)  # decodes first: one attention call
        segments, ids, last = [], [], []
        for i in order:
            seq = items[i][0]
            segments.append(Segment(seq.num_draft_computed, len(pending[i]), seq.blocks))
            ids.extend(pending[i])
            last.append(len(ids) - 1)
        batch = PagedBatch(self.store, segments)
        out = self.model(torch.tensor([ids], dtype=torch.long), position_ids=batch.position_ids, cache=batch, skip_logits=True)
        rows = self.model.lm_head(out.last_hidden_state[0, last]).float()
        for (seq, _), p in zip(items, pending):
            seq.num_draft_computed += len(p)
        back = torch.empty(len(items), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(items))
        return rows[back]

    def propose(self, items: list[tuple[Any, SequenceSampler, int]], guides: list[Any] | None = None) -> list[Proposal]:
        """Up to k draft tokens for each (sequence, sampler, k): k batched draft calls, a sequence leaving once it has its
        k. guides[i] (a GrammarLookahead, or None) masks item i's draws; its proposal ends where the grammar is
        complete, refuses the draw, or fails (that request alone: the engine's own matcher then decides)."""
        guides = guides or [None] * len(items)
        props = [Proposal(start=len(seq.tokens), bonus_from_draft=seeded_sampling(s)) for seq, s, _ in items]
        active = [i for i, (_, _, k) in enumerate(items) if k > 0]
        while active:
            rows = self.logits([(items[i][0], props[i].tokens) for i in active])
            ended = set()
            for row, i in zip(rows, active):
                prop, guide = props[i], guides[i]
                try:
                    allowed = guide.allowed() if guide is not None else None
                    token, q = self.draw(row, _with_tokens(items[i][1], prop.tokens), prop.start + len(prop.tokens), allowed)
                    if guide is not None and not guide.take(token):
                        ended.add(i)
                        continue
                except Exception:  # noqa: BLE001 - this request's grammar: its proposal ends here
                    if guide is None:
                        raise
                    ended.add(i)
                    continue
                prop.tokens.append(token)
                prop.probs.append(q)
                if guide is not None and guide.done():
                    ended.add(i)
            active = [i for i in active if len(props[i].tokens) < items[i][2] and i not in ended]
        return props

    def draw(self, row: torch.Tensor, sampler: SequenceSampler, position: int, allowed: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None]:
        """(draft token at position, the distribution q it was drawn from, None for greedy) from a row of draft logits,
        under the grammar mask allowed if given."""
        row = _processed(row, sampler, allowed)
        if sampler.params.greedy:
            return int(row.argmax()), None
        q = distribution(row, sampler.params)
        return race(q, self._generator(sampler, position, DRAW)), q

    def decide(self, row: torch.Tensor, sampler: SequenceSampler, q: torch.Tensor | None, token: int, position: int,
               allowed: torch.Tensor | None = None) -> tuple[int, bool]:
        """(the token at position, whether it is the draft's) given a row of target logits, the grammar mask there (if
        any) and the draft's token and q."""
        row = _processed(row, sampler, allowed)
        if sampler.params.greedy:
            best = int(row.argmax())
            return best, best == token
        return accept_or_resample(distribution(row, sampler.params), q, token, self._generator(sampler, position, DECIDE))

    def bonus(self, row: torch.Tensor, sampler: SequenceSampler, position: int, allowed: torch.Tensor | None = None) -> int:
        """The token at position drawn from the target's distribution alone (all drafts kept)."""
        row = _processed(row, sampler, allowed)
        if sampler.params.greedy:
            return int(row.argmax())
        return race(distribution(row, sampler.params), self._generator(sampler, position, DECIDE))

    def _generator(self, sampler: SequenceSampler, position: int, purpose: int) -> torch.Generator:
        seed = sampler.generator.initial_seed()
        return self.generator.manual_seed((seed * _MIX[0] + position * _MIX[1] + (purpose + 1) * _MIX[2]) % (1 << 63))


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int, generator: torch.Generator) -> tuple[int, bool]:
    """Rejection sampling of one draft token drawn from q, against the target's p: (the token, whether it was kept).

    Keeps it with probability min(1, p(token) / q(token)); otherwise draws from norm(max(0, p - q)). The result is
    distributed as p whatever q is (Leviathan et al. 2023, appendix A.1).
    """
    u = float(torch.rand((), generator=generator))
    if u * float(q[token]) < float(p[token]):
        return token, True
    residual = (p - q).clamp_(min=0.0)
    # A rejection needs p(token) < q(token), so the residual has mass; rounding alone could leave none.
    return race(residual if float(residual.sum()) > 0 else p, generator), False


def race(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from (possibly unnormalised) probabilities: the exponential race argmax p_i / E_i."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise))


def sample_result(row: torch.Tensor, token: int, sampler: SequenceSampler) -> SampleResult:
    """The SampleResult of a token decided from a row of target logits: its logprobs as `sample` reports them."""
    r = SampleResult(token)
    k = sampler.params.logprobs
    if k is not None:
        logprobs = torch.log_softmax(row.float(), dim=-1)
        r.logprob = float(logprobs[token])
        if k:
            values, ids = torch.topk(logprobs, k)
            r.top = list(zip(ids.tolist(), values.tolist()))
    return r


def _processed(row: torch.Tensor, sampler: SequenceSampler, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """A row of logits in fp32 with the request's penalties, logit_bias and grammar mask applied (as `sample` does)."""
    row = row.float()
    if sampler.counts is not None or sampler.bias is not None or allowed is not None:
        row = row.clone()
        process_row(row, sampler, allowed)
    return row


def _with_tokens(sampler: SequenceSampler, tokens: list[int]) -> SequenceSampler:
    """The sampler as it will be once tokens are generated (their penalty counts), for the draft's later positions."""
    if sampler.counts is None or not tokens:
        return sampler
    view = copy.copy(sampler)
    view.counts, view.seen = sampler.counts.clone(), sampler.seen.clone()
    for t in tokens:
        view.record(t)
    return view


def check_same_vocabulary(target: Path, draft: Path) -> None:
    """InputError unless the draft directory has the target's vocabulary: the same vocab_size and, where either has a
    tokenizer.json, the same tokens with the same ids. Reads config and tokenizer files only (before any weights)."""
    from mlc.io.hfdir import read_config

    sizes = read_config(target).get("vocab_size"), read_config(draft).get("vocab_size")
    hint = "give --draft a model of the served model's tokenizer family (e.g. a smaller model trained with its tokenizer)"
    if sizes[0] != sizes[1]:
        raise InputError(f"the draft model's vocabulary has {sizes[1]} tokens, the served model's {sizes[0]}", hint)
    vocabs = _tokenizer_vocab(target), _tokenizer_vocab(draft)
    if vocabs[0] != vocabs[1]:
        if vocabs[0] is None or vocabs[1] is None:
            problem = f"one of {target} and {draft} has a tokenizer.json and the other none, so their vocabularies cannot be compared"
        else:
            problem = f"the draft model's tokenizer ({draft}) maps tokens to ids differently from the served model's"
        raise InputError(problem, hint)


def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    if not (path / "tokenizer.json").is_file():
        return None
    from mlc.models.tokenizer import load_tokenizer

    return load_tokenizer(path).backend.get_vocab(with_added_tokens=True)


def load_draft(path: Path, dtype: str | None) -> Any:
    """The draft model at path for serving (fused projections; bf16 activations for quantised weights unless dtype says)."""
    from mlc.io.hfdir import read_config
    from mlc.models import load_model
    from mlc.models.transformer import fuse_projections

    if dtype is None and "quantization_config" in read_config(path):
        dtype = "bfloat16"
    model = load_model(path, dtype=dtype)
    fuse_projections(model)
    return model


def check_draft(draft: Any, target: Any, max_model_len: int) -> None:
    """InputError when the loaded draft cannot serve beside the target (vocabulary, positions)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise InputError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens, the served model's "
                         f"{target.config.vocab_size}", "give --draft a model of the served model's tokenizer family")
    if draft.config.max_position_embeddings < max_model_len:
        raise InputError(f"the draft model has {draft.config.max_position_embeddings} positions, fewer than the maximum "
                         f"model length {max_model_len}", "lower --max-model-len")
