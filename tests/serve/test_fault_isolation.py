"""A fault in one request fails that request alone: the engine loop and every other request in its batch go on,
with the same tokens as in a run without the fault (tiny random llama, greedy and seeded sampling)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest
from mlc.kernels.sampling import SamplingParams
from mlc.models import load_model
from tests.serve.test_engine_models import NumberTokenizer

N, FAULTY = 16, 7
NUM_BLOCKS = 256


class FaultyParams(SamplingParams):
    """Sampling parameters that raise on the k-th read of min_p, which only a random draw reads (once): a fault in the
    middle of `sample`, after the sequences before this one in the batch have drawn from their generators."""

    def __init__(self, fail_at: int, **kw):
        super().__init__(**kw)
        self.reads, self.fail_at = 0, fail_at

    @property
    def min_p(self) -> float:
        self.reads += 1
        if self.reads >= self.fail_at:
            raise RuntimeError("injected sampling fault")
        return self._min_p

    @min_p.setter
    def min_p(self, value: float) -> None:
        self._min_p = value


def params(i: int) -> dict:
    """A mix: greedy, seeded sampling with top_p/top_k, penalties (they keep per-sequence counts), logprobs."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_p=0.9, seed=100 + i),
        dict(temperature=0.7, top_k=20, seed=200 + i, repetition_penalty=1.3, presence_penalty=0.5),
        dict(temperature=1.0, seed=300 + i, logprobs=2),
    ]
    return {**kinds[i % 4], "logit_bias": {127: -100.0}}  # token 127 is the magic token of the forward-fault test


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 120, (int(n),), generator=gen).tolist() for n in torch.randint(4, 20, (N,), generator=gen)]


def run_batch(model, make_params, prompt_list, max_tokens=12):
    """All requests submitted before the first step (one batch), run to the end; {index: (tokens, finish, error)}."""
    engine = Engine(model, NumberTokenizer(), EngineConfig(num_blocks=NUM_BLOCKS, block_size=4, max_batched_tokens=512))
    out = {i: [[], None, None] for i in range(len(prompt_list))}

    def sink(ev):
        o = out[int(ev.request_id)]
        o[0] += ev.token_ids
        if ev.finish_reason is not None:
            o[1], o[2] = ev.finish_reason, getattr(ev, "error", None)

    for i, p in enumerate(prompt_list):
        engine.submit(GenerationRequest(str(i), p, make_params(i), max_tokens=max_tokens, ignore_eos=True), sink)
    engine.run_until_idle()
    return {i: tuple(v) for i, v in out.items()}, engine


@pytest.fixture(scope="module")
def model(tiny_hf_model):
    return load_model(tiny_hf_model("llama"))


def test_a_fault_in_one_requests_sampling_leaves_the_other_15_unchanged(model):
    ps = prompts()
    reference, _ = run_batch(model, lambda i: SamplingParams(**params(i)), ps)
    faulty = lambda i: FaultyParams(4, **params(1)) if i == FAULTY else SamplingParams(**params(i))  # noqa: E731
    got, engine = run_batch(model, faulty, ps)
    tokens, finish, error = got[FAULTY]
    assert finish == "error" and "injected sampling fault" in error
    assert len(tokens) == 3  # it failed in the batch, at its fourth token
    for i in range(N):
        if i != FAULTY:
            assert got[i] == reference[i], f"request {i}"
    assert all(got[i][1] == "length" for i in range(N) if i != FAULTY)
    assert engine.pool.num_free == NUM_BLOCKS  # the failed request's blocks were freed too
    assert engine.metrics.value("request_success_total", finished_reason="error") == 1


def test_a_fault_in_one_sibling_of_an_n_3_request_fails_all_three_and_frees_their_blocks(model):
    engine = Engine(model, NumberTokenizer(), EngineConfig(num_blocks=NUM_BLOCKS, block_size=4, max_batched_tokens=512))
    events = []
    kw = dict(max_tokens=8, ignore_eos=True)
    engine.submit(GenerationRequest("faulty", list(range(5, 25)), FaultyParams(5, temperature=1.0, seed=3), n=3, **kw), events.append)
    engine.submit(GenerationRequest("other", list(range(5, 25)), SamplingParams(temperature=1.0, seed=4), n=2, **kw), events.append)
    engine.run_until_idle()
    final = {(ev.request_id, ev.index): ev.finish_reason for ev in events if ev.finish_reason}
    assert final == {("faulty", 0): "error", ("faulty", 1): "error", ("faulty", 2): "error", ("other", 0): "length", ("other", 1): "length"}
    assert engine.pool.num_free == NUM_BLOCKS


def test_a_fault_in_one_requests_forward_pass_fails_it_alone(model, monkeypatch):
    """The model raises on a magic token in the flat batch (as a kernel bug on one request's input would): the step
    is retried one sequence at a time, and only the sequence holding the token fails."""
    ps = prompts()
    ps[FAULTY] = ps[FAULTY][:2] + [127] + ps[FAULTY][2:]
    greedy = lambda i: SamplingParams(temperature=0.0, logit_bias={127: -100.0})  # noqa: E731
    clean = [p if i != FAULTY else [t for t in p if t != 127] for i, p in enumerate(ps)]
    reference, _ = run_batch(model, greedy, clean)
    forward = model.forward

    def faulty_forward(input_ids, *args, **kw):
        if (input_ids == 127).any():
            raise RuntimeError("injected forward fault")
        return forward(input_ids, *args, **kw)

    monkeypatch.setattr(model, "forward", faulty_forward)
    got, engine = run_batch(model, greedy, ps)
    assert got[FAULTY][1] == "error" and "injected forward fault" in got[FAULTY][2] and got[FAULTY][0] == []
    for i in range(N):
        if i != FAULTY:
            assert got[i] == reference[i], f"request {i}"
    assert engine.pool.num_free == NUM_BLOCKS


def test_a_fault_in_scheduling_one_request_fails_it_alone(model, monkeypatch):
    """The prefix-cache lookup raises on one request's prompt (as a bookkeeping bug tied to its tokens would)."""
    ps = prompts()
    ps[FAULTY] = [126] + ps[FAULTY]
    greedy = lambda i: SamplingParams(temperature=0.0)  # noqa: E731
    reference, _ = run_batch(model, greedy, ps)
    from mlc.commands.serve.blocks import KVBlockPool

    lookup = KVBlockPool.lookup

    def faulty_lookup(self, tokens, *args, **kw):
        if tokens and tokens[0] == 126:
            raise KeyError("injected scheduling fault")
        return lookup(self, tokens, *args, **kw)

    monkeypatch.setattr(KVBlockPool, "lookup", faulty_lookup)
    got, engine = run_batch(model, greedy, ps)
    assert got[FAULTY][1] == "error" and "injected scheduling fault" in got[FAULTY][2] and got[FAULTY][0] == []
    for i in range(N):
        if i != FAULTY:
            assert got[i] == reference[i], f"request {i}"
    assert engine.pool.num_free == NUM_BLOCKS and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("bad", [
    dict(prompt_ids=[]),
    dict(prompt_ids=[5, -1]),
    dict(prompt_ids=[5, 128]),
    dict(params=SamplingParams(logit_bias={-1: 100.0})),
    dict(params=SamplingParams(logit_bias={10**9: 1.0})),
    dict(stop_token_ids=[-3]),
    dict(max_tokens=0),
])
def test_a_request_the_http_edge_would_refuse_fails_alone_inside_the_engine_too(model, bad):
    """Defence in depth: the engine checks what it is given at admission, off the decode path."""
    engine = Engine(model, NumberTokenizer(), EngineConfig(num_blocks=64, block_size=4, max_batched_tokens=64))
    events = []
    kw = dict(prompt_ids=[5, 6, 7], params=SamplingParams(temperature=0.0), max_tokens=4)
    engine.submit(GenerationRequest("bad", **{**kw, **bad}), events.append)
    engine.submit(GenerationRequest("good", **kw), events.append)
    engine.run_until_idle()
    final = {ev.request_id: ev for ev in events if ev.finish_reason is not None}
    assert final["bad"].finish_reason == "error" and final["bad"].error
    assert final["good"].finish_reason == "length" and engine.pool.num_free == 64


def test_the_engine_loop_outlives_a_fault_and_reports_itself_healthy(model):
    engine = Engine(model, NumberTokenizer(), EngineConfig(num_blocks=64, block_size=4, max_batched_tokens=64))
    finished = threading.Semaphore(0)
    events = []

    def sink(ev):
        events.append(ev)
        if ev.finish_reason is not None:
            finished.release()

    assert not engine.healthy()  # not running yet
    engine.start()
    try:
        engine.submit(GenerationRequest("bad", [5, 6, 7], FaultyParams(2, temperature=1.0, seed=1), max_tokens=8), sink)
        assert finished.acquire(timeout=60)
        engine.submit(GenerationRequest("good", [5, 6, 7], SamplingParams(temperature=0.0), max_tokens=8), sink)
        assert finished.acquire(timeout=60)
        assert [ev.finish_reason for ev in events if ev.finish_reason] == ["error", "length"]
        assert engine.healthy()
        time.sleep(0.6)  # idle: the loop still beats
        assert engine.healthy()
    finally:
        engine.stop()
    assert not engine.healthy()
