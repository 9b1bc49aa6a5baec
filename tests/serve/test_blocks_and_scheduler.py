"""The block pool's prefix cache and the scheduler's batching rules, on pure bookkeeping (no model)."""

from __future__ import annotations

from mlc.commands.serve.blocks import KVBlockPool
from mlc.commands.serve.scheduler import Scheduler, Sequence


def run_step(sched: Scheduler) -> list[tuple[Sequence, int]]:
    """A fake model step: every scheduled sequence computes its tokens; caught-up ones 'sample' token 7."""
    plan = sched.schedule()
    for seq, n in plan:
        sched.complete(seq, n)
        if seq.num_computed == len(seq.tokens):
            seq.tokens.append(7)
    return plan


def test_freed_blocks_stay_findable_by_prefix_until_reused_least_recently_freed_first():
    pool = KVBlockPool(num_blocks=4, block_size=2)
    a = pool.allocate(2)
    parent = pool.register(a[0], 0, [1, 2])
    pool.register(a[1], parent, [3, 4])
    pool.release(a)
    assert pool.num_free == 4
    blocks, _ = pool.lookup([1, 2, 3, 4, 5], max_tokens=4)
    assert blocks == a and pool.num_free == 2
    assert (pool.prefix_queries, pool.prefix_hits) == (4, 4)
    pool.release(blocks)
    # The same tokens after a different first block are a different prefix: no hit.
    assert pool.lookup([9, 9, 3, 4], max_tokens=4)[0] == []
    # Allocating 3 blocks takes the two never-used blocks first, then evicts the tail block a[1] (freed first).
    fresh = pool.allocate(3)
    assert set(fresh[:2]).isdisjoint(a) and fresh[2] == a[1]
    assert pool.lookup([1, 2, 3, 4], max_tokens=4)[0] == [a[0]]


def test_decodes_come_first_and_prefills_are_chunked_into_the_token_budget():
    pool = KVBlockPool(num_blocks=64, block_size=4)
    sched = Scheduler(pool, max_batched_tokens=10, max_running=8)
    old = Sequence(1, list(range(100, 103)), 3)
    sched.add(old)
    run_step(sched)  # old's prompt (3 tokens) is computed, its first token sampled
    new = Sequence(2, list(range(200, 225)), 25)
    sched.add(new)
    plan = run_step(sched)
    assert [(s.seq_id, n) for s, n in plan] == [(1, 1), (2, 9)]  # the decode, then 9 prompt tokens
    plan = run_step(sched)
    assert [(s.seq_id, n) for s, n in plan] == [(1, 1), (2, 9)]
    plan = run_step(sched)
    assert [(s.seq_id, n) for s, n in plan] == [(1, 1), (2, 7)]  # the last 7 prompt tokens, then new samples
    assert new.num_computed == 25 and len(new.tokens) == 26


def test_max_running_caps_the_batch():
    sched = Scheduler(KVBlockPool(64, 4), max_batched_tokens=100, max_running=2)
    for i in range(3):
        sched.add(Sequence(i, [i] * 5, 5))
    plan = run_step(sched)
    assert [s.seq_id for s, _ in plan] == [0, 1] and len(sched.waiting) == 1


def test_out_of_blocks_preempts_the_newest_request_and_recomputes_it_later():
    pool = KVBlockPool(num_blocks=4, block_size=2)
    sched = Scheduler(pool, max_batched_tokens=16, max_running=4)
    first, second = Sequence(1, [1, 2, 3], 3, arrival=1.0), Sequence(2, [4, 5, 6], 3, arrival=2.0)
    sched.add(first)
    sched.add(second)
    run_step(sched)  # 2 blocks each: the pool is full
    assert pool.num_free == 0
    run_step(sched)  # both decode into their second block (positions 3): still fits
    plan = run_step(sched)  # position 4 needs a third block each: the newest (second) is preempted
    assert [s.seq_id for s, _ in plan] == [1]
    assert second.num_computed == 0 and second.num_preemptions == 1 and sched.waiting[0] is second
    sched.finish(first)
    hits = pool.prefix_hits
    plan = run_step(sched)
    # Recompute prompt + the 2 tokens it had generated, less what its surviving cached blocks still hold.
    assert [s for s, _ in plan] == [second] and second.num_computed == 5
    assert plan[0][1] == 5 - (pool.prefix_hits - hits)
    sched.finish(second)
    assert pool.num_free == 4


def test_n_samples_share_the_leaders_prompt_blocks():
    pool = KVBlockPool(num_blocks=16, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(pool, max_batched_tokens=64, max_running=8)
    prompt = list(range(10))
    leader = Sequence(1, list(prompt), 10)
    follower = Sequence(2, list(prompt), 10, leader=leader)
    sched.add(leader)
    sched.add(follower)
    plan = run_step(sched)
    assert [s.seq_id for s, _ in plan] == [1]  # the follower waits for the leader's prompt
    plan = run_step(sched)
    # The follower reuses the two full prompt blocks and computes only the last 2 prompt tokens.
    assert (follower, 2) in plan and follower.blocks[:2] == leader.blocks[:2]
    assert pool.refcount[leader.blocks[0]] == 2
    sched.finish(leader)
    sched.finish(follower)
    assert pool.num_free == 16
