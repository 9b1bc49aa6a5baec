"""Speculative decoding by n-gram prompt lookup: greedy output identical to decoding without it, seeded sampling drawing
the same tokens (rejection sampling of a certain draft keeps each token's distribution), drafts both accepted and
rejected along the way, and no KV block left behind."""

from __future__ import annotations

import pytest
import torch

from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest
from mlc.commands.serve.speculative import NgramIndex
from mlc.kernels.sampling import SamplingParams
from mlc.models import load_model
from mlc.models.generate import generate
from tests.serve.test_engine_models import NumberTokenizer


def test_the_lookup_proposes_what_followed_the_latest_earlier_match_of_the_longest_suffix():
    index = NgramIndex()
    tokens = [1, 2, 3, 4, 9, 9, 2, 3, 5, 6, 7, 1, 2, 3]
    assert index.propose(tokens, 4) == [4, 9, 9, 2]  # the trigram "1 2 3" wins over the later bigram "2 3"
    tokens += [4]  # the index grows with the sequence: "2 3 4" occurred at the start
    assert index.propose(tokens, 2) == [9, 9]
    assert NgramIndex().propose([5, 6, 7, 8, 6, 7], 2) == [8, 6]  # no trigram: the bigram "6 7"
    assert NgramIndex().propose([1, 2, 3], 3) == []  # nothing repeats
    assert NgramIndex().propose([7, 8, 7], 5) == [8, 7]  # a draft may run into the suffix itself


def run(model, prompts, spec: int, params: SamplingParams, max_tokens: int = 40):
    engine = Engine(model, NumberTokenizer(), EngineConfig(num_blocks=96, block_size=4, max_batched_tokens=64, speculative_tokens=spec))
    out: dict[str, list[int]] = {}

    def sink(ev):
        out.setdefault(ev.request_id, []).extend(ev.token_ids)
        assert ev.finish_reason in (None, "length"), ev.error

    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), p, params, max_tokens=max_tokens, ignore_eos=True), sink)
    engine.run_until_idle()
    assert engine.pool.num_free == 96
    return [out[str(i)] for i in range(len(prompts))], engine


@pytest.fixture(scope="module")
def model_and_prompts(tiny_hf_model):
    model = load_model(tiny_hf_model("llama"), dtype="float32")
    gen = torch.Generator().manual_seed(0)
    # Copy-heavy prompts: a passage, then its start again (the lookup finds the rest of it in the prompt).
    prompts = []
    for n in (12, 20, 30):
        text = torch.randint(3, 128, (n,), generator=gen).tolist()
        prompts.append(text + [1] + text[: n // 3])
    return model, prompts


def test_greedy_output_is_identical_to_decoding_without_drafts_and_to_the_models_own_generate(model_and_prompts):
    model, prompts = model_and_prompts
    greedy = SamplingParams(temperature=0)
    plain, _ = run(model, prompts, 0, greedy)
    fast, engine = run(model, prompts, 5, greedy)
    assert fast == plain
    for p, tokens in zip(prompts, fast):
        assert tokens == generate(model, p, 40)[0]
    m = engine.metrics
    drafted, accepted = m.spec_draft_tokens._value.get(), m.spec_accepted_tokens._value.get()
    assert 0 < accepted < drafted  # drafts were both accepted and rejected
    assert engine.steps < run(model, prompts, 0, greedy)[1].steps  # fewer model calls


def test_a_seeded_sampled_request_draws_the_same_tokens_with_drafts(model_and_prompts):
    model, prompts = model_and_prompts
    for seed in (1, 2, 3):
        params = SamplingParams(temperature=0.7, top_p=0.95, presence_penalty=0.3, seed=seed)
        plain, _ = run(model, prompts, 0, params)
        fast, engine = run(model, prompts, 4, params)
        assert fast == plain, seed
        assert engine.metrics.spec_draft_tokens._value.get() > 0
