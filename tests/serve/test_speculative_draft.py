"""Speculative decoding with a draft model (draft.py): the rejection-sampling rule keeps the target's distribution
(checked against the target's probabilities, and shown to catch the naive rule), greedy output and logprobs equal
decoding without the draft, a seeded request draws the same tokens whatever shares its batch, a draft of another
vocabulary is refused, and every KV block comes back after requests, aborts and a client that walks away."""

from __future__ import annotations

import copy
import json
import shutil
import time

import pytest
import torch

from mlc.commands.serve.draft import DraftModel, accept_or_resample, check_same_vocabulary, race
from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest
from mlc.errors import InputError
from mlc.kernels.sampling import SamplingParams, SequenceSampler, distribution
from mlc.models import load_model
from mlc.models.generate import generate
from tests.serve.test_engine_models import NumberTokenizer

BLOCKS = 96


def truncated(model, layers: int):
    """The model's first `layers` decoder layers with its final norm and head: a draft that often agrees with it."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config = draft.config.with_updates(num_hidden_layers=layers)
    return draft


@pytest.fixture(scope="module")
def models(tiny_hf_model):
    target = load_model(tiny_hf_model("llama"), dtype="float32")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (7, 15, 26)]
    return target, truncated(target, 2), prompts


def engine_for(target, draft, k: int) -> Engine:
    config = EngineConfig(num_blocks=BLOCKS, block_size=4, max_batched_tokens=64, speculative_tokens=k)
    return Engine(target, NumberTokenizer(), config, draft=draft if k else None)


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list]:
    events: dict[str, list] = {}

    def sink(ev):
        assert ev.finish_reason != "error", ev.error
        events.setdefault(ev.request_id, []).append(ev)

    for r in requests:
        engine.submit(r, sink)
    engine.run_until_idle()
    assert engine.pool.num_free == BLOCKS
    return events


def tokens(events) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def test_rejection_sampling_draws_from_the_targets_distribution_and_the_naive_rule_would_not():
    # p (target) and q (draft) over 6 tokens; the draft token comes from q, the rule keeps or replaces it.
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=gen) * 1.5, 0)
    q = torch.softmax(torch.randn(6, generator=gen) * 1.5, 0)
    n = 20000
    counts, naive, kept = torch.zeros(6), torch.zeros(6), 0
    g = torch.Generator()
    for i in range(n):
        g.manual_seed(i)
        d = race(q, g)
        token, ok = accept_or_resample(p, q, d, g)
        counts[token] += 1
        kept += ok
        naive[d if ok else race(p, g)] += 1  # resampling from p itself instead of norm(max(0, p - q))

    def chi2(c):
        return float(((c - n * p) ** 2 / (n * p)).sum())

    assert chi2(counts) < 20.5  # 5 degrees of freedom: exceeded with probability 0.001 under the target's distribution
    assert chi2(naive) > 200
    assert abs(kept / n - float(torch.minimum(p, q).sum())) < 0.015  # acceptance is 1 - TV(p, q), the papers' optimum


def test_the_first_speculative_token_follows_the_targets_top_k_distribution_on_real_model_rows(models):
    # The engine's own path (the request's processing of each model's logits, per-position generators), top_k=4 so that
    # 4 tokens carry the target's mass and the draft's support differs from it in part.
    target, draft, prompts = models
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        p_row, q_row = target(ids).logits[0, -1], draft(ids).logits[0, -1]
    params = SamplingParams(temperature=0.8, top_k=4)
    p = distribution(p_row.float(), params)
    q = distribution(q_row.float(), params)
    support = p.nonzero().flatten().tolist()
    assert len(support) == 4 and 0.0 < float(torch.minimum(p, q).sum()) < 0.999  # the draft often, not always, agrees
    rule = DraftModel(draft, 4, 4)
    n, counts = 3000, torch.zeros_like(p)
    for i in range(n):
        sampler = SequenceSampler(SamplingParams(temperature=0.8, top_k=4, seed=i), len(p), prompts[0])
        d, q_used = rule.draw(q_row, sampler, len(prompts[0]))
        token, _ = rule.decide(p_row, sampler, q_used, d, len(prompts[0]))
        counts[token] += 1
    assert counts.sum() == counts[support].sum()  # nothing outside the target's top 4
    expected = n * p[support]
    assert float(((counts[support] - expected) ** 2 / expected).sum()) < 16.3  # 3 degrees of freedom, p = 0.001


def test_greedy_output_and_logprobs_with_a_draft_model_equal_decoding_without_it(models):
    target, draft, prompts = models
    greedy = SamplingParams(temperature=0, logprobs=2)
    plain = run(engine_for(target, None, 0), [GenerationRequest(str(i), p, greedy, max_tokens=30, ignore_eos=True) for i, p in enumerate(prompts)])
    stop_at = tokens(plain["2"])[12]  # a stop token that ends request 2 part-way, inside a step's drafts or not
    engine = engine_for(target, draft, 4)
    proposals = []  # (the sequence's tokens, the draft tokens proposed after them)
    propose = engine.draft.propose

    def spy(items, guides=None):
        contexts = [list(seq.tokens) for seq, _, _ in items]
        made = propose(items, guides)
        proposals.extend(zip(contexts, [p.tokens for p in made]))
        return made

    engine.draft.propose = spy
    requests = [GenerationRequest(str(i), p, greedy, max_tokens=30, ignore_eos=True) for i, p in enumerate(prompts)]
    requests.append(GenerationRequest("stop", prompts[2], greedy, max_tokens=30, stop_token_ids=[stop_at]))
    fast = run(engine, requests)
    for i, p in enumerate(prompts):
        assert tokens(fast[str(i)]) == tokens(plain[str(i)]) == generate(target, p, 30)[0]
        mine = [r for ev in fast[str(i)] for r in ev.logprobs]
        ref = [r for ev in plain[str(i)] for r in ev.logprobs]
        assert [r.top[0][0] for r in mine] == [r.top[0][0] for r in ref]
        assert torch.allclose(torch.tensor([r.logprob for r in mine]), torch.tensor([r.logprob for r in ref]), atol=1e-4)
    expected = tokens(plain["2"])
    assert tokens(fast["stop"]) == expected[: expected.index(stop_at) + 1] and fast["stop"][-1].finish_reason == "stop"
    m = engine.metrics
    drafted, accepted = m.spec_draft_tokens._value.get(), m.spec_accepted_tokens._value.get()
    assert 0 < accepted < drafted  # drafts both kept and rejected
    # After every rejection the draft's paged cache was rolled back right: each proposal is the draft's own greedy
    # continuation, computed afresh with a contiguous cache.
    for context, drafts in proposals:
        assert drafts == generate(draft, context, len(drafts))[0]


def test_a_draft_that_is_the_target_itself_has_every_draft_kept(models):
    # With q = p every draft is kept (greedy: the same argmax; sampled: min(1, p/q) = 1), if both sides process their
    # logits alike and the draft's cache follows the sequence (catch-ups, bonus tokens, steps with fewer drafts than K).
    target, _, prompts = models
    engine = engine_for(target, copy.deepcopy(target), 4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.7, top_k=20)]
    run(engine, [GenerationRequest(str(i), p, params[i], max_tokens=20 + 3 * i, ignore_eos=True) for i, p in enumerate(prompts)])
    m = engine.metrics
    assert m.spec_accepted_tokens._value.get() == m.spec_draft_tokens._value.get() > 40


def test_a_seeded_request_draws_the_same_tokens_alone_or_batched_with_any_number_of_drafts(models):
    target, draft, prompts = models

    def sampled(seed, penalty=0.3):
        return SamplingParams(temperature=0.9, top_p=0.95, presence_penalty=penalty, seed=seed)

    alone = run(engine_for(target, draft, 2), [GenerationRequest("a", prompts[1], sampled(7), max_tokens=24, ignore_eos=True)])
    crowd = [GenerationRequest("a", prompts[1], sampled(7), max_tokens=24, ignore_eos=True)]
    crowd += [GenerationRequest(str(i), p, sampled(i), max_tokens=24, ignore_eos=True) for i, p in enumerate(prompts)]
    engine = engine_for(target, draft, 5)
    batched = run(engine, crowd)
    assert tokens(alone["a"]) == tokens(batched["a"])
    assert tokens(batched["1"]) != tokens(batched["a"])  # the same prompt with another seed: the seed matters
    assert engine.metrics.spec_accepted_tokens._value.get() > 0


def test_every_kv_block_comes_back_after_an_abort_mid_speculation(models):
    target, draft, prompts = models
    engine = engine_for(target, draft, 4)
    seen: dict[str, list] = {}

    def sink(ev):
        seen.setdefault(ev.request_id, []).append(ev)

    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0) if i else SamplingParams(temperature=1.0, seed=3)
        engine.submit(GenerationRequest(str(i), p, params, max_tokens=60, ignore_eos=True), sink)
    with torch.inference_mode():
        engine._drain_inbox()
        while sum(len(tokens(seen.get(str(i), []))) for i in range(3)) < 12:
            engine.step()
    assert engine.pool.num_free < BLOCKS
    engine.abort("0", notify=True)  # what the HTTP layer does when a client disconnects
    engine.abort("2")
    engine.run_until_idle()
    assert seen["0"][-1].finish_reason == "abort" and seen["1"][-1].finish_reason == "length"
    assert engine.pool.num_free == BLOCKS


def _with_tokenizer(src, out, words: list[str]):
    """A copy of the model directory src with a word-level tokenizer of `words` (byte-level, as llguidance needs)."""
    shutil.copytree(src, out)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"\u0120" + w: i for i, w in enumerate(words)}  # the byte-level form of " w"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="\u0120" + words[0]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "\u0120" + words[1], "unk_token": "\u0120" + words[0]}))
    return out


def test_a_draft_model_of_another_vocabulary_is_refused_in_one_line(tiny_hf_model, tmp_path, run_mlc):
    target, small_vocab = tiny_hf_model("llama"), tiny_hf_model("llama", vocab_size=96)
    with pytest.raises(InputError, match="96 tokens, the served model's 128"):
        check_same_vocabulary(target, small_vocab)
    words = [f"w{i}" for i in range(128)]
    a = _with_tokenizer(target, tmp_path / "a", words)
    b = _with_tokenizer(target, tmp_path / "b", words[:2] + words[2:][::-1])  # same size, tokens renumbered
    check_same_vocabulary(a, _with_tokenizer(target, tmp_path / "a2", words))
    with pytest.raises(InputError, match="maps tokens to ids differently"):
        check_same_vocabulary(a, b)
    code, _, err = run_mlc("serve", str(a), "--draft", str(b), "--num-speculative-tokens", "3", "--port", "1")
    assert code != 0 and "maps tokens to ids differently" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_mlc("serve", str(a), "--draft", str(a))
    assert code != 0 and "--num-speculative-tokens" in err


@pytest.mark.slow
def test_a_served_draft_gives_the_same_greedy_text_and_frees_its_blocks_after_a_disconnect(tiny_hf_model, tmp_path):
    """Also for a request with a grammar (response_format json_schema), through the official openai client."""
    from mlc.models.tokenizer import load_tokenizer
    from tests.serve.conftest import http, start_server
    from tests.serve.test_speculative_grammar import FORMAT, TEXTS, check_schema, with_byte_level_tokenizer
    from tests.serve.test_speculative_grammar import run as run_constrained

    target = with_byte_level_tokenizer(tiny_hf_model("llama"), tmp_path / "target")
    draft = with_byte_level_tokenizer(tiny_hf_model("llama", num_hidden_layers=1, seed=1), tmp_path / "draft")
    server = start_server(target, tmp_path / "serve", "--draft", str(draft), "--num-speculative-tokens", "3", "--dtype", "float32",
                          "--kv-cache-memory", "4MiB", "--max-model-len", "128")
    try:
        tok, model = load_tokenizer(target), load_model(target, dtype="float32")
        body = {"model": "target", "prompt": TEXTS[2], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        status, out = http(server, "POST", "/v1/completions", body)
        assert status == 200, out
        assert out["choices"][0]["text"] == tok.decode(generate(model, tok.encode(TEXTS[2]), 20)[0], skip_special_tokens=True)
        constrained = server.client().completions.create(model="target", prompt=TEXTS[1], max_tokens=60, temperature=0,
                                                         extra_body={"response_format": FORMAT}).choices[0]
        reference, engine = run_constrained((model, None, target, None), 0, SamplingParams(temperature=0), prompts=[tok.encode(TEXTS[1])])
        assert constrained.text == tok.decode(reference[0]) and constrained.finish_reason == "stop"
        check_schema(engine, reference[0])
        stream = server.client(timeout=30).completions.create(model="target", prompt=body["prompt"], max_tokens=80, temperature=0,
                                                              extra_body={"ignore_eos": True}, stream=True)
        for k, _ in enumerate(stream):
            if k == 3:
                stream.close()  # the client walks away mid-stream
                break
        deadline = time.monotonic() + 30
        while server.metrics()["vllm:num_requests_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        m = server.metrics()
        assert m["vllm:spec_decode_num_draft_tokens_total"] > 0
        assert m["mlc:kv_cache_free_blocks"] == m["mlc:kv_cache_total_blocks"] and m["vllm:num_requests_running"] == 0
    finally:
        server.stop()
