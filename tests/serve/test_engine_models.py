"""The engine (paged cache, chunked prefill, continuous batching) against the model's own contiguous-cache
`generate`, on tiny random models of each architecture: sliding windows (Mistral) and experts (Mixtral,
Qwen2-MoE) included."""

from __future__ import annotations

import threading

import pytest
import torch

from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest
from mlc.kernels.sampling import SamplingParams
from mlc.models import load_model
from mlc.models.generate import generate


class NumberTokenizer:
    """Token ids as text; the engine only needs decode and eos ids."""

    eos_token_ids: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def run_engine(model, prompts, max_tokens, **config):
    engine = Engine(model, NumberTokenizer(), EngineConfig(**{"num_blocks": 64, "block_size": 4, "max_batched_tokens": 16, **config}))
    out = {i: [] for i in range(len(prompts))}
    done = threading.Semaphore(0)

    def sink(ev):
        out[int(ev.request_id)].extend(ev.token_ids)
        if ev.finish_reason:
            done.release()

    engine.start()
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), p, SamplingParams(temperature=0), max_tokens=max_tokens), sink)
    for _ in prompts:
        assert done.acquire(timeout=120)
    free = engine.pool.num_free
    engine.stop()
    run_engine.preemptions = engine.scheduler.num_preemptions
    return out, free


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "mixtral", "qwen2_moe"])
def test_batched_paged_greedy_equals_the_models_own_generate(kind, tiny_hf_model):
    model = load_model(tiny_hf_model(kind))
    gen = torch.Generator().manual_seed(0)
    # Prompts longer than Mistral's window of 8, chunked by a 16-token budget shared by 5 sequences.
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 13, 21, 9, 30)]
    out, free = run_engine(model, prompts, max_tokens=12)
    for i, p in enumerate(prompts):
        assert out[i] == generate(model, p, 12)[0], f"{kind} prompt {i}"
    assert free == 64


def test_preemption_under_a_tiny_pool_still_gives_the_same_tokens(tiny_hf_model):
    model = load_model(tiny_hf_model("llama"))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (10,), generator=gen).tolist() for _ in range(4)]
    # 4 sequences of up to 30 tokens need 32 blocks of 4; 16 forces preemption and recompute.
    out, free = run_engine(model, prompts, max_tokens=20, num_blocks=16)
    assert run_engine.preemptions > 0
    for i, p in enumerate(prompts):
        assert out[i] == generate(model, p, 20)[0]
    assert free == 16


def test_a_repeated_prompt_reuses_its_cached_blocks_and_gives_the_same_tokens(tiny_hf_model):
    model = load_model(tiny_hf_model("qwen2"))
    engine = Engine(model, NumberTokenizer(), EngineConfig(num_blocks=32, block_size=4, max_batched_tokens=64))
    prompt = list(range(10, 27))  # 17 tokens: 4 full blocks, the last token always recomputed
    events = []
    done = threading.Semaphore(0)

    def sink(ev):
        events.append(ev)
        if ev.finish_reason:
            done.release()

    engine.start()
    for rid in ("first", "second"):
        engine.submit(GenerationRequest(rid, prompt, SamplingParams(temperature=0), max_tokens=6), sink)
        assert done.acquire(timeout=60)
    engine.stop()
    final = {ev.request_id: ev for ev in events if ev.finish_reason}
    tokens = {rid: [t for ev in events if ev.request_id == rid for t in ev.token_ids] for rid in final}
    assert final["first"].cached_tokens == 0 and final["second"].cached_tokens == 16
    assert tokens["first"] == tokens["second"] == generate(model, prompt, 6)[0]
    assert (engine.pool.prefix_queries, engine.pool.prefix_hits) == (32, 16)


@pytest.mark.slow
def test_compiled_decode_steps_give_the_same_greedy_tokens(tiny_hf_model):
    """`mlc serve --compile`: decode-only steps run through torch.compile, prefill steps eagerly."""
    from torch._dynamo.utils import counters

    model = load_model(tiny_hf_model("llama"))
    engine = Engine(model, NumberTokenizer(), EngineConfig(num_blocks=64, block_size=4, max_batched_tokens=16, compile=True))
    compiled_before = counters["stats"]["unique_graphs"]
    engine.warm_up()
    assert engine._decode_forward is not None, "warm-up fell back to eager"
    assert counters["stats"]["unique_graphs"] > compiled_before
    assert engine.pool.num_free == 64 and engine.metrics.value("generation_tokens_total") == 0  # warm-up leaves no trace
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 13, 9)]
    out = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), p, SamplingParams(temperature=0), max_tokens=10),
                      lambda ev: out[int(ev.request_id)].extend(ev.token_ids))
    engine.run_until_idle()
    for i, p in enumerate(prompts):
        assert out[i] == generate(model, p, 10)[0], f"prompt {i}"
    assert engine.pool.num_free == 64
