"""KV eviction for long contexts (`mlc serve --kv-policy h2o|scope --kv-budget N`): H2O's heavy hitters, SCOPE's decode budget.

Both hold a sequence to a fixed number of cache entries per layer and kv head, dropping the rest after each engine
step, so its KV memory stops growing at the budget (its blocks past the budget go back to the pool):

- h2o (Zhang et al., NeurIPS'23, "H2O: Heavy-Hitter Oracle"): every entry carries the attention it has received,
  summed over every query that has seen it (the q heads sharing a kv head add up). Past the budget N an entry is
  kept if it is one of the N/2 most recent positions, or among the N - N/2 others with the most accumulated
  attention: the paper's equal split between a recent window and heavy hitters. Prefill chunks evict too, so a
  prompt longer than the budget is held to it (the step that computes a chunk holds up to N + chunk entries).
- scope (Wu et al., ACL'25, its "slide" decoding strategy with the prefill cache kept whole): every entry of the
  prompt is kept; N bounds the entries of generated tokens: the N/2 most recent plus the N - N/2 others the step's
  own queries attend to most (the latest step's attention, not a sum: SCOPE's answer to heavy hitters drifting
  during a long output). A sequence then holds at most prompt + N entries.

As in both papers' reference code, the step's queries attend over every entry (the kept ones and the step's new
ones) and the cache is trimmed afterwards. The attention output is the engine's own attention call, unchanged; the
scores come from a second, explicit softmax(q k^T / sqrt(d)) over the same keys in fp32 (the fused attention
returns no probabilities). A budget at or above a sequence's length therefore evicts nothing and gives output
bit-identical to full attention.

Cache layout: a sequence's entries 0..L-1 live in its blocks as before, but entry i of layer l, kv head h holds the
position `pos[l, h, i]` (keys are stored after RoPE, so attention needs no positions; new tokens still get their
true positions). An eviction moves the kept entries from past the budget into the holes below it (one copy per
dropped entry per layer and head), then frees the blocks past the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlc.commands.serve.blocks import KVBlockPool
from mlc.errors import MlcUsageError
from mlc.kernels.paged_attention import PagedBatch, PagedKVStore, Segment, slot_table

POLICIES = ("full", "h2o", "scope")
MIN_BUDGET = 16  # below this the recent half is a handful of tokens: no longer a sensible setting


def check_kv_policy(policy: str, budget: int | None) -> None:
    """Raise MlcUsageError unless --kv-policy and --kv-budget make sense together."""
    if policy not in POLICIES:
        raise MlcUsageError(f"--kv-policy {policy!r} is not full, h2o or scope", "choose one of them (full, the default, keeps every position)")
    if policy == "full":
        if budget is not None:
            raise MlcUsageError("--kv-budget applies to --kv-policy h2o or scope", "add --kv-policy h2o (or scope), or leave out --kv-budget")
        return
    if budget is None:
        raise MlcUsageError(f"--kv-policy {policy} needs --kv-budget N (the KV positions a sequence keeps)", "add e.g. --kv-budget 512")
    if budget < MIN_BUDGET:
        raise MlcUsageError(f"--kv-budget {budget} is below the minimum of {MIN_BUDGET} positions", f"give --kv-budget {MIN_BUDGET} or more")


def engine_conflict(model_config: Any, prefix_caching: bool = False, speculative_tokens: int = 0, compile: bool = False) -> str | None:
    """Why the engine cannot evict KV entries of this model with these options, or None."""
    if prefix_caching:
        return "KV eviction rewrites blocks in place, so they cannot be shared through the prefix cache"
    if speculative_tokens:
        return "KV eviction does not cover speculative decoding (drafts are written to the cache and rolled back)"
    if compile:
        return "KV eviction does not run under torch.compile yet"
    if any(model_config.layer_window(i) is not None for i in range(model_config.num_hidden_layers)):
        return "KV eviction needs full-attention layers; this model has a sliding window (its masks count positions)"
    return None


@dataclass
class KVPolicy:
    name: str  # "h2o" or "scope"
    budget: int

    @property
    def recent(self) -> int:
        """Entries of the most recent positions that are always kept: half the budget, the rest are heavy hitters."""
        return self.budget // 2


@dataclass(eq=False)
class Entries:
    """One sequence's cache entries, per layer and kv head: the position each holds and the attention it is scored by."""

    pos: torch.Tensor  # (layers, kv_heads, allocated) long; entries 0..length-1 are live
    score: torch.Tensor  # (layers, kv_heads, allocated) float32
    length: int = 0

    def append(self, first: int, n: int) -> None:
        """Add the entries of positions first..first+n-1 (score 0), growing the buffers by doubling."""
        end = self.length + n
        if end > self.pos.shape[-1]:
            grow = max(end, 2 * self.pos.shape[-1]) - self.pos.shape[-1]
            self.pos = torch.cat([self.pos, self.pos.new_zeros(*self.pos.shape[:2], grow)], dim=-1)
            self.score = torch.cat([self.score, self.score.new_zeros(*self.score.shape[:2], grow)], dim=-1)
        self.pos[..., self.length : end] = torch.arange(first, first + n)
        self.score[..., self.length : end] = 0.0
        self.length = end


class ScoredBatch(PagedBatch):
    """A PagedBatch that also records, per layer and segment, the attention each cache entry received in this step."""

    def __init__(self, store: PagedKVStore, segments: list[Segment]):
        super().__init__(store, segments)
        self.entries = [s.start + s.length for s in segments]  # each segment's cache length after the step
        self.scores: list[list[torch.Tensor]] = [[] for _ in store.k]  # [layer][segment]: (kv_heads, entries) fp32

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None
    ) -> torch.Tensor:
        out = super().attend(layer_idx, q, k, v, sliding_window)  # writes k, v into the cache first
        self.scores[layer_idx] = self._received(layer_idx, q, k)
        return out

    def _received(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        """For each segment, the attention probability its queries gave each of its entries, summed over queries and the
        q heads of each kv head: (kv_heads, entries)."""
        kc = self.store.k[layer_idx]
        hq, hkv, d = q.shape[1], kc.shape[0], q.shape[3]
        g = hq // hkv  # q head i reads kv head i // g
        out: list[torch.Tensor] = []
        if self.num_decodes:
            b, length = self.num_decodes, self.decode_max
            qd = q[0, :, :b].transpose(0, 1).reshape(b, hkv, g, d).float()
            keys = kc.index_select(1, self.decode_gather).view(hkv, b, length, d).transpose(0, 1).float()
            logits = torch.matmul(qd, keys.transpose(-1, -2)) * d**-0.5  # (b, kv_heads, g, length)
            mask = self._decode_mask(None)
            if mask is not None:
                logits = logits + mask.float()
            probs = torch.softmax(logits, dim=-1).sum(dim=2)
            out.extend(probs[i, :, : self.entries[i]] for i in range(b))
        for i, (first, n, start, gather_idx) in enumerate(self.prefills):
            keys = k[0, :, first : first + n] if gather_idx is None else kc.index_select(1, gather_idx)
            qs = q[0, :, first : first + n].reshape(hkv, g, n, d).float()
            logits = torch.matmul(qs, keys.float().transpose(-1, -2).unsqueeze(1)) * d**-0.5  # (kv_heads, g, n, entries)
            qpos = torch.arange(start, start + n)[:, None]
            logits.masked_fill_(torch.arange(keys.shape[1])[None, :] > qpos, float("-inf"))
            out.append(torch.softmax(logits, dim=-1).sum(dim=(1, 2)))
        return out


class KVEvictor:
    """Applies a KVPolicy to the engine's sequences: a ScoredBatch for each step, then the eviction after it."""

    def __init__(self, policy: KVPolicy, store: PagedKVStore, pool: KVBlockPool):
        self.policy, self.store, self.pool = policy, store, pool
        self._batch: ScoredBatch | None = None
        self.num_evicted = 0  # positions dropped, over all sequences (a position counts once, not per layer)

    def batch(self, segments: list[Segment]) -> ScoredBatch:
        """The step's batch (it remembers the scores until after_step)."""
        self._batch = ScoredBatch(self.store, segments)
        return self._batch

    def after_step(self, plan: list[tuple[Any, int]]) -> None:
        """Fold the step's attention into each sequence's scores and evict past its budget; plan: the step's (sequence, n)
        in the batch's order, each already booked (num_computed counts the step's tokens)."""
        batch, self._batch = self._batch, None
        for i, (seq, n) in enumerate(plan):
            if seq.finished:  # failed or aborted within the step: its blocks are gone
                continue
            self._update(seq, n, torch.stack([layer[i] for layer in batch.scores]))

    def _update(self, seq: Any, n: int, received: torch.Tensor) -> None:
        layers, heads, length = received.shape
        if seq.kv is None:
            seq.kv = Entries(torch.zeros(layers, heads, 0, dtype=torch.long), torch.zeros(layers, heads, 0))
        e: Entries = seq.kv
        e.append(seq.num_computed - n, n)  # now e.length == length == seq.num_computed - seq.num_evicted
        if self.policy.name == "h2o":
            e.score[..., :length] += received
            cap = self.policy.budget
        else:
            e.score[..., :length] = received
            cap = self.policy.budget + min(seq.prompt_len, seq.num_computed)
        if length > cap:
            self._evict(seq, e, cap)

    def _evict(self, seq: Any, e: Entries, cap: int) -> None:
        """Keep cap entries in every layer and head: the protected ones (recent; for scope the prompt's too) and the
        best scored of the rest; fill the holes below cap with the kept entries above it; free the blocks past cap."""
        length = e.length
        pos = e.pos[..., :length]
        protected = pos >= seq.num_computed - self.policy.recent
        if self.policy.name == "scope":
            protected |= pos < seq.prompt_len
        ranked = e.score[..., :length].masked_fill(protected, float("inf"))
        keep = torch.zeros_like(protected).scatter_(-1, ranked.topk(cap, dim=-1).indices, True)
        # Per layer and head, the holes below cap and the kept entries past it are equally many; nonzero lists both in
        # (layer, head, index) order, so row r of one pairs with row r of the other.
        holes = (~keep[..., :cap]).nonzero()
        moved = keep[..., cap:].nonzero()
        moved[:, 2] += cap
        slots = slot_table([seq.blocks], length, self.pool.block_size)[0]
        counts = torch.bincount(holes[:, 0], minlength=len(self.store.k)).tolist()
        for layer, (h, m) in enumerate(zip(holes.split(counts), moved.split(counts))):
            if len(h):
                dst, src = slots[h[:, 2]], slots[m[:, 2]]
                for cache in (self.store.k[layer], self.store.v[layer]):
                    cache[h[:, 1], dst] = cache[m[:, 1], src]
        for t in (e.pos, e.score):
            t[holes[:, 0], holes[:, 1], holes[:, 2]] = t[moved[:, 0], moved[:, 1], moved[:, 2]]
        e.length = cap
        seq.num_evicted += length - cap
        self.num_evicted += length - cap
        kept_blocks = -(-cap // self.pool.block_size)
        if len(seq.blocks) > kept_blocks:
            self.pool.release(seq.blocks[kept_blocks:])
            seq.blocks = seq.blocks[:kept_blocks]
