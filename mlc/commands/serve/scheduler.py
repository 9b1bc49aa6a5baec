"""Iteration-level continuous batching: which sequences run how many tokens in the next model step.

One rule covers everything (as in vLLM): a sequence's computed tokens catch up with its known
tokens (prompt + generated). A decode needs 1 token, a prefill the rest of its prompt, a preempted
sequence its whole history again. Each step spends a token budget (`max_batched_tokens`): running
decodes first, then running partial prefills, then waiting sequences in arrival order, each prefill
cut into the budget that is left (Sarathi-Serve's stall-free chunked prefill). When the pool has no
block for a running sequence, the newest running sequence is preempted: its blocks are freed and it
is recomputed later (its prefix blocks often survive in the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mlc.commands.serve.blocks import NO_PARENT, KVBlockPool, block_hash


@dataclass(eq=False)
class Sequence:
    """One stream of tokens being generated (a request with n=2 has two)."""

    seq_id: int
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    arrival: float = field(default_factory=time.monotonic)
    leader: Sequence | None = None  # for n > 1: the sibling whose prompt blocks this one shares
    owner: Any = None  # the engine's per-sequence state (sampling, output stream)
    num_computed: int = 0  # leading tokens whose keys and values are in the cache
    # With a draft model (draft.py): leading tokens whose keys and values are in the draft's cache (the same blocks).
    num_draft_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    num_registered: int = 0  # leading blocks registered in the prefix cache
    parent_hash: int = NO_PARENT  # hash of the last registered block
    # Where this sequence's chain of block hashes starts: NO_PARENT, or a LoRA adapter's salt, so that blocks whose keys and
    # values were computed under different adapters are never shared through the prefix cache.
    root_hash: int = NO_PARENT
    num_preemptions: int = 0
    finished: bool = False
    # KV eviction (kv_policy.py): positions dropped from this sequence's cache (the same number in every layer and head),
    # so its cache holds num_computed - num_evicted entries; and the policy's state (the position and score of each entry).
    num_evicted: int = 0
    kv: Any = None

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed


class Scheduler:
    def __init__(self, pool: KVBlockPool, max_batched_tokens: int, max_running: int):
        self.pool = pool
        self.max_batched_tokens = max_batched_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Sequences whose own scheduling raised, taken out of the queues; the engine fails their requests.
        self.faults: list[tuple[Sequence, Exception]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of new tokens) pairs for the next step, decodes first."""
        budget = self.max_batched_tokens
        plan: dict[Sequence, int] = {}
        preempted = False
        decodes = [s for s in self.running if s.num_pending == 1]
        prefills = [s for s in self.running if s.num_pending > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.finished or seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending, budget)
            try:
                while not self._reserve(seq, n):
                    victim = max(self.running, key=lambda s: (s.arrival, s.seq_id))
                    budget += plan.pop(victim, 0)
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
            except Exception as e:  # noqa: BLE001 - this sequence's fault: set it aside, schedule the others
                self._set_aside(seq, e)
                continue
            if seq in self.running:
                plan[seq] = n
                budget -= n
        # Admit waiting sequences only when nothing had to be preempted (they would just thrash).
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.leader is not None and not seq.blocks and self._leader_busy(seq.leader):
                break  # wait for the leader's prompt so its blocks can be shared, not recomputed
            try:
                if not seq.blocks:
                    self._claim_prefix(seq)
                n = min(seq.num_pending, budget)
                reserved = self._reserve(seq, n)
            except Exception as e:  # noqa: BLE001
                self._set_aside(seq, e)
                continue
            if not reserved:
                self._reset(seq)  # hold no blocks while waiting, or running sequences could starve
                break
            self.waiting.popleft()
            self.running.append(seq)
            plan[seq] = n
            budget -= n
        return list(plan.items())

    def _set_aside(self, seq: Sequence, e: Exception) -> None:
        """Take a sequence whose scheduling raised out of the queues (its blocks go back when it is finished)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.faults.append((seq, e))

    def complete(self, seq: Sequence, n: int) -> None:
        """Record that the step computed n more tokens of seq; register its newly filled blocks."""
        seq.num_computed += n
        if not self.pool.enable_prefix_caching:
            return
        bs = self.pool.block_size
        while (seq.num_registered + 1) * bs <= seq.num_computed:
            i = seq.num_registered
            seq.parent_hash = self.pool.register(seq.blocks[i], seq.parent_hash, seq.tokens[i * bs : (i + 1) * bs])
            seq.num_registered += 1

    def finish(self, seq: Sequence) -> None:
        """Remove seq (done or aborted) from the queues and free its blocks."""
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    def _leader_busy(self, leader: Sequence) -> bool:
        return not leader.finished and leader.num_computed < leader.prompt_len

    def _claim_prefix(self, seq: Sequence) -> None:
        # The last prompt token is always recomputed: its logits give the first sampled token.
        limit = len(seq.tokens) - 1
        bs = self.pool.block_size
        leader = seq.leader
        if leader is not None and leader.blocks and leader.num_computed >= leader.prompt_len:
            k = min(limit, leader.prompt_len) // bs
            seq.blocks = leader.blocks[:k]
            self.pool.share(seq.blocks)
            parent = seq.root_hash
            for i in range(k):
                parent = hash(block_hash(parent, seq.tokens[i * bs : (i + 1) * bs]))
        else:
            seq.blocks, parent = self.pool.lookup(seq.tokens, limit, seq.root_hash)
        seq.num_computed = seq.num_registered = len(seq.blocks)
        seq.num_computed *= bs
        seq.parent_hash = parent

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Make seq's blocks cover n tokens from num_computed if blocks are free (no preemption); False otherwise."""
        return self._reserve(seq, n)

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Make seq's blocks cover n more tokens; False when the pool has too few free."""
        need = -(-(seq.num_computed - seq.num_evicted + n) // self.pool.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.blocks.extend(self.pool.allocate(need))
        return True

    def _reset(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = seq.num_registered = seq.num_draft_computed = seq.num_evicted = 0
        seq.parent_hash = seq.root_hash
        seq.kv = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._reset(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
