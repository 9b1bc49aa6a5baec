"""Paged attention against plain attention, the sampling rules against their formulas, stop strings across tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlc.commands.serve.textstream import TextStream
from mlc.kernels.paged_attention import PagedBatch, PagedKVStore, Segment
from mlc.kernels.sampling import SamplingParams, SequenceSampler, sample


def reference_attention(q, k, v, window=None):
    """Causal attention of the last q.shape[2] positions over all of k, v (b=1), with repeated kv heads."""
    hq, t, d = q.shape[1], q.shape[2], q.shape[3]
    n = k.shape[2]
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    qpos = torch.arange(n - t, n)[:, None]
    kpos = torch.arange(n)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("window", [None, 5])
def test_a_mixed_paged_batch_equals_attention_of_each_sequence_alone(window):
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 8, 4
    store = PagedKVStore(1, num_blocks=32, block_size=bs, kv_heads=hkv, head_dim=d, dtype=torch.float32)
    # Each sequence: (past length, new tokens, its blocks scattered in the pool). Two decodes, a chunk with a past, a fresh prefill.
    specs = [(9, 1, [7, 3, 12]), (2, 1, [5]), (6, 5, [20, 1, 30]), (0, 7, [9, 2])]
    full = [(torch.randn(1, hkv, p + n, d), torch.randn(1, hkv, p + n, d), torch.randn(1, hq, n, d)) for p, n, _ in specs]
    # Write every past key/value through a first step per sequence, as the engine would have.
    for (p, n, blocks), (k, v, _) in zip(specs, full):
        if p:
            past = PagedBatch(store, [Segment(0, p, blocks)])
            past.attend(0, torch.zeros(1, hq, p, d), k[:, :, :p], v[:, :, :p])
    batch = PagedBatch(store, [Segment(p, n, blocks) for p, n, blocks in specs])
    assert batch.num_decodes == 2
    assert batch.position_ids.tolist() == [[9, 2, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6]]
    q = torch.cat([x[2] for x in full], dim=2)
    k_new = torch.cat([x[0][:, :, p:] for (p, _, _), x in zip(specs, full)], dim=2)
    v_new = torch.cat([x[1][:, :, p:] for (p, _, _), x in zip(specs, full)], dim=2)
    out = batch.attend(0, q, k_new, v_new, sliding_window=window)
    expected = torch.cat([reference_attention(qs, k, v, window) for k, v, qs in full], dim=2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def samplers(params, vocab=8):
    return [SequenceSampler(p, vocab, prompt=[]) for p in params]


def test_greedy_top_k_1_and_a_tiny_top_p_all_pick_the_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3, 1.9], [3.0, 0.0, 0.0, 2.9]])
    for p in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6, seed=1)):
        assert [r.token for r in sample(logits, samplers([p, p], 4))] == [1, 0]


def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    mine = SamplingParams(temperature=1.0, seed=42)
    s = samplers([mine], 50)
    alone = [sample(logits[2:3], s)[0].token for _ in range(20)]
    crowd = samplers([SamplingParams(seed=i) for i in range(2)] + [mine] + [SamplingParams(temperature=0.5)] * 2, 50)
    together = [sample(logits, crowd)[2].token for _ in range(20)]
    assert together == alone and len(set(alone)) > 1


def test_sampled_frequencies_follow_the_temperature_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    s = samplers([SamplingParams(temperature=0.7, seed=3)], 4)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(logits, s)[0].token] += 1
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(counts / 4000, expected, atol=0.025)


def test_top_k_top_p_and_min_p_keep_only_the_tokens_their_definitions_allow():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    cases = [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.65), {0, 1}),  # 0.4 < 0.65 needs the second token; 0.7 >= 0.65 stops
        (SamplingParams(min_p=0.6), {0, 1}),  # keep p >= 0.6 * 0.4 = 0.24
    ]
    for params, allowed in cases:
        params.seed = 0
        s = samplers([params], 4)
        seen = {sample(logits, s)[0].token for _ in range(300)}
        assert seen == allowed, params


def test_penalties_and_logit_bias_follow_their_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    # Repetition penalty on seen (prompt) tokens: positive logits divided, negative multiplied.
    rep = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=5.0), 4, prompt=[0, 1])
    assert sample(logits, [rep])[0].token == 2  # token 0: 2.0 / 5 = 0.4 < 0.5
    weak = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=3.0), 4, prompt=[0])
    assert sample(logits, [weak])[0].token == 0  # 2.0 / 3 = 0.67 > 0.5
    # Presence and frequency penalties on generated tokens: logit - count * frequency - presence.
    s = SequenceSampler(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.6), 4, prompt=[])
    s.record(0)
    assert sample(logits, [s])[0].token == 0  # 2.0 - 0.6 - 0.5 = 0.9 > 0.5; sampling counts it again
    assert sample(logits, [s])[0].token == 2  # 2.0 - 2 * 0.6 - 0.5 = 0.3 < 0.5
    biased = SequenceSampler(SamplingParams(temperature=0, logit_bias={3: 100.0}), 4, prompt=[])
    assert sample(logits, [biased])[0].token == 3


def test_logprobs_are_the_raw_log_softmax_with_the_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    r = sample(logits, samplers([SamplingParams(temperature=0, logprobs=2)], 4))[0]
    ref = F.log_softmax(logits[0], -1)
    assert r.token == 1 and r.logprob == pytest.approx(float(ref[1]))
    assert [t for t, _ in r.top] == [1, 2] and r.top[1][1] == pytest.approx(float(ref[2]))


class CharTokenizer:
    """Token i decodes to PIECES[i]; enough to test text assembly without a real vocabulary."""

    PIECES = ["Hel", "lo", " wor", "ld", "!", " E", "ND", " more"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def test_a_stop_string_spanning_tokens_ends_the_text_before_it_and_is_never_streamed():
    stream = TextStream(CharTokenizer(), stop=["d! E"])
    streamed = ""
    for tok in [0, 1, 2, 3, 4]:
        assert not stream.add(tok)
        streamed += stream.take(final=False)
    assert streamed == "Hello wor"  # "ld!" is held back: it might begin the stop string
    assert stream.add(5)  # " E" completes "d! E" across three tokens
    streamed += stream.take(final=True)
    assert streamed == "Hello worl" and stream.stopped_by == "d! E"
