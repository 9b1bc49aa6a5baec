"""KV eviction (`mlc serve --kv-policy h2o|scope --kv-budget N`, serve/kv_policy.py) on a tiny random Llama.

A budget at or above the sequence's length changes nothing (bit-identical logprobs); past it each sequence holds at
most the budget (scope: its prompt plus the budget) in entries and blocks, read from the engine after every step;
and the positions the engine keeps in each layer and kv head are the ones an independent H2O (and SCOPE), written
here in plain torch from the papers' recipes over a contiguous cache, keeps on the same tokens.
"""

from __future__ import annotations

import pytest
import torch

from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest
from mlc.kernels.sampling import SamplingParams
from mlc.models import load_model
from mlc.models.generate import generate


class NumberTokenizer:
    eos_token_ids: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def model(tiny_hf_model):
    m = load_model(tiny_hf_model("llama"))
    with torch.no_grad():  # sharper attention than a random init gives: heavy hitters stand out, top-k has clear winners
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return m


def run(model, prompts, max_tokens, spy=None, **config):
    """{request index: (tokens, logprobs)} from an engine run in this thread; spy(engine) is called after every step."""
    cfg = {"num_blocks": 64, "block_size": 4, "max_batched_tokens": 64, "enable_prefix_caching": False, **config}
    engine = Engine(model, NumberTokenizer(), EngineConfig(**cfg))
    out = {i: ([], []) for i in range(len(prompts))}

    def sink(ev):
        out[int(ev.request_id)][0].extend(ev.token_ids)
        out[int(ev.request_id)][1].extend(r.logprob for r in ev.logprobs)

    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), p, SamplingParams(temperature=0, logprobs=0), max_tokens=max_tokens), sink)
    if spy is not None and engine.evictor is not None:
        after = engine.evictor.after_step

        def spying(plan):
            after(plan)
            spy(engine, plan)

        engine.evictor.after_step = spying
    with torch.inference_mode():
        engine.run_until_idle()
    assert engine.pool.num_free == cfg["num_blocks"]  # every block back once the requests are done
    return out, engine


PROMPTS = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 13, 30, 9)]


@pytest.mark.parametrize("policy", ["h2o", "scope"])
def test_a_budget_at_or_above_the_length_gives_full_attentions_logprobs_bit_for_bit(model, policy):
    # A 16-token step budget chunks the 30-token prompt: chunked prefill goes through the scored path too.
    full, _ = run(model, PROMPTS, 12, max_batched_tokens=16)
    evicting, engine = run(model, PROMPTS, 12, kv_policy=policy, kv_budget=42, max_batched_tokens=16)
    assert engine.evictor.num_evicted == 0
    assert evicting == full
    assert full[2][0] == generate(model, PROMPTS[2], 12)[0]


def test_past_the_budget_each_sequence_holds_its_budget_in_entries_and_blocks(model):
    budget, bs = 16, 4
    seen = {"h2o": [], "scope": []}

    def check(policy):
        def spy(engine, plan):
            for seq, _ in plan:
                if seq.finished:
                    continue
                cap = budget + (seq.prompt_len if policy == "scope" else 0)
                held = seq.num_computed - seq.num_evicted
                assert held == seq.kv.length == min(seq.num_computed, cap)
                assert len(seq.blocks) == -(-held // bs)
                # Every layer and head holds distinct positions, all computed, the most recent half of the budget among them.
                pos = seq.kv.pos[..., :held]
                assert (pos.sort(dim=-1).values.diff(dim=-1) > 0).all() and int(pos.max()) == seq.num_computed - 1
                recent = torch.arange(seq.num_computed - budget // 2, seq.num_computed)
                assert torch.isin(recent, pos).all() if held >= budget // 2 else True
                if policy == "scope":  # the prompt is kept whole
                    assert torch.isin(torch.arange(min(seq.prompt_len, seq.num_computed)), pos).all()
                seen[policy].append((seq.seq_id, seq.num_computed, held, engine.pool.num_blocks - engine.pool.num_free))
        return spy

    long_prompts = [PROMPTS[2], PROMPTS[0]]  # 30 tokens (over the budget: h2o evicts during the chunked prefill) and 5
    for policy in ("h2o", "scope"):
        run(model, long_prompts, 60, check(policy), kv_policy=policy, kv_budget=budget, max_batched_tokens=8)
        steps = seen[policy]
        assert max(n for _, n, _, _ in steps) == 30 + 59  # the long sequence ran well past its budget
        # Memory stays flat: the blocks in use never exceed both sequences' caps.
        caps = sum(-(-(budget + (len(p) if policy == "scope" else 0)) // bs) for p in long_prompts)
        assert max(used for *_, used in steps) <= caps
        assert any(held < n for _, n, held, _ in steps)


class ReferenceEviction:
    """H2O (or SCOPE's slide) by the papers' recipes over a contiguous cache, one token per forward (AttentionCache).

    After each token's attention: H2O adds the attention each key received to its score and, past the budget, keeps
    the budget//2 most recent positions plus the top budget - budget//2 of the others by score (per kv head; the q
    heads of a group summed), as H2O's real-drop cache does. SCOPE keeps the prompt, and among generated tokens the
    budget//2 most recent plus the top others by this token's attention alone.
    """

    def __init__(self, layers: int, budget: int, prompt_len: int, scope: bool):
        self.budget, self.prompt_len, self.scope = budget, prompt_len, scope
        self.k, self.v, self.pos, self.score = ([None] * layers for _ in range(4))
        self.t = -1

    def positions(self, input_ids):
        self.t += 1
        return torch.tensor([[self.t]])

    def attend(self, layer, q, k, v, sliding_window=None):
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k[0], v[0]
            self.pos[layer], self.score[layer] = torch.full((hkv, 1), self.t), torch.zeros(hkv, 1)
        else:
            self.k[layer], self.v[layer] = torch.cat([self.k[layer], k[0]], 1), torch.cat([self.v[layer], v[0]], 1)
            self.pos[layer] = torch.cat([self.pos[layer], torch.full((hkv, 1), self.t)], 1)
            self.score[layer] = torch.cat([self.score[layer], torch.zeros(hkv, 1)], 1)
        keys, values = self.k[layer], self.v[layer]
        probs = torch.softmax(q[0].view(hkv, hq // hkv, d) @ keys.transpose(1, 2) / d**0.5, dim=-1)  # (hkv, group, keys)
        out = (probs @ values).reshape(1, hq, 1, d)
        received = probs.sum(1)
        self.score[layer] = received if self.scope else self.score[layer] + received
        pos, recent = self.pos[layer], self.budget // 2
        cap = self.budget + (min(self.prompt_len, self.t + 1) if self.scope else 0)
        if pos.shape[1] > cap:
            kept_always = pos > self.t - recent
            if self.scope:
                kept_always |= pos < self.prompt_len
            heavy = self.score[layer].masked_fill(kept_always, float("-inf")).topk(cap - int(kept_always[0].sum()), dim=-1).indices
            keep = kept_always.clone()
            keep.scatter_(1, heavy, True)
            idx = keep.nonzero()[:, 1].view(hkv, cap)
            self.k[layer] = keys.gather(1, idx[..., None].expand(-1, -1, d))
            self.v[layer] = values.gather(1, idx[..., None].expand(-1, -1, d))
            self.pos[layer], self.score[layer] = pos.gather(1, idx), self.score[layer].gather(1, idx)
        return out


@pytest.mark.parametrize("policy", ["h2o", "scope"])
def test_the_positions_kept_and_the_logprobs_are_those_of_a_plain_torch_reference(model, policy):
    budget, prompt, steps = 16, PROMPTS[0], 80
    engine_kept = {}

    def spy(engine, plan):
        (seq, _), = plan
        e = seq.kv
        engine_kept[seq.num_computed] = scored(e.pos[..., : e.length], e.score[..., : e.length])

    out, engine = run(model, [prompt], steps, spy, kv_policy=policy, kv_budget=budget)
    generated, logprobs = out[0]
    tokens = prompt + generated
    ref = ReferenceEviction(model.config.num_hidden_layers, budget, len(prompt), scope=policy == "scope")
    with torch.inference_mode():
        for t, token in enumerate(tokens[:-1]):  # teacher-forced on the engine's own tokens
            logits = model(torch.tensor([[token]]), cache=ref).logits[0, -1]
            if t + 1 >= len(prompt):  # the engine's state after each of its steps (the prompt is one step)
                mine, theirs = engine_kept[t + 1], scored(torch.stack(ref.pos), torch.stack(ref.score))
                assert [[set(h) for h in layer] for layer in mine] == [[set(h) for h in layer] for layer in theirs], f"after position {t}"
                # And each kept position's score (scope's after the prompt's step: the engine's sums the prompt's queries,
                # the token-by-token reference holds the last one's; scope evicts no prompt entry, so neither is used).
                for a, b in zip(sum(mine, []), sum(theirs, [])) if policy == "h2o" or t >= len(prompt) else ():
                    assert [a[p] for p in sorted(a)] == pytest.approx([b[p] for p in sorted(a)], abs=1e-4)
            if t >= len(prompt) - 1:  # the engine's logprob of the next token, computed over its evicted cache
                expected = torch.log_softmax(logits.float(), dim=-1)[tokens[t + 1]]
                assert logprobs[t + 1 - len(prompt)] == pytest.approx(float(expected), abs=1e-4), f"at position {t}"
    assert engine.evictor.num_evicted == len(tokens) - 1 - budget - (len(prompt) if policy == "scope" else 0)
    # Not a plain window: every head keeps heavy hitters from before the recent half.
    assert all(min(head) < len(tokens) - 1 - budget // 2 for layer in engine_kept[len(tokens) - 1] for head in layer)


def scored(pos: torch.Tensor, score: torch.Tensor) -> list[list[dict[int, float]]]:
    """{position: score} of each layer and head's entries."""
    return [[dict(zip(p.tolist(), s.tolist())) for p, s in zip(lp, ls)] for lp, ls in zip(pos, score)]


@pytest.mark.parametrize("args, message", [
    (["--kv-policy", "lru"], "--kv-policy 'lru' is not full, h2o or scope"),
    (["--kv-policy", "h2o"], "--kv-policy h2o needs --kv-budget N"),
    (["--kv-budget", "64"], "--kv-budget applies to --kv-policy h2o or scope"),
    (["--kv-policy", "scope", "--kv-budget", "8"], "--kv-budget 8 is below the minimum of 16"),
    (["--kv-policy", "h2o", "--kv-budget", "64", "--prefix-caching"], "cannot be shared by --prefix-caching"),
    (["--kv-policy", "h2o", "--kv-budget", "64", "--num-speculative-tokens", "4"], "does not cover speculative decoding"),
    (["--kv-policy", "h2o", "--kv-budget", "64", "--compile"], "does not run under --compile"),
    (["--kv-policy", "h2o", "--kv-budget", "64", "--engine", "vllm"], "--kv-policy is for mlc's engine"),
])
def test_kv_policy_options_that_cannot_work_are_one_line_usage_errors(tmp_path, run_mlc, args, message):
    code, _, err = run_mlc("serve", str(tmp_path), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_h2o_serves_contexts_longer_than_its_kv_cache_and_a_sliding_window_model_is_refused(tiny_hf_model, tmp_path):
    from mlc.commands.serve.server import ServeConfig, load_engine
    from mlc.errors import InputError
    from tests.serve.test_speculative_draft import _with_tokenizer

    words = [f"w{i}" for i in range(128)]
    path = _with_tokenizer(tiny_hf_model("llama"), tmp_path / "llama", words)
    per_block = 2 * 3 * 16 * 2 * 16 * 4  # layers, block size, kv heads, head dim, fp32
    cfg = ServeConfig(str(path), kv_policy="h2o", kv_budget=32, enable_prefix_caching=False, max_batched_tokens=16)
    engine, _, _ = load_engine(cfg, "tiny", path, 5 * per_block)  # 80 tokens of cache: a budget of 32 + a step of 16 fits
    assert engine.config.max_model_len == 256 and engine.evictor is not None  # the model's positions, not the cache's 80
    with pytest.raises(InputError, match="fewer than --kv-budget plus a step's --max-batched-tokens"):
        load_engine(cfg, "tiny", path, 3 * per_block)
    with pytest.raises(InputError, match="sliding window"):
        load_engine(ServeConfig(str(path), kv_policy="scope", kv_budget=32, enable_prefix_caching=False), "m",
                    _with_tokenizer(tiny_hf_model("mistral"), tmp_path / "mistral", words), 64 * per_block)


@pytest.mark.slow
def test_a_served_h2o_model_answers_the_openai_client_and_reports_its_evictions(tiny_hf_model, tmp_path):
    from tests.serve.conftest import start_server
    from tests.serve.test_speculative_draft import _with_tokenizer

    words = [f"w{i}" for i in range(128)]
    path = _with_tokenizer(tiny_hf_model("llama"), tmp_path / "llama", words)
    server = start_server(path, tmp_path / "serve", "--kv-policy", "h2o", "--kv-budget", "16", "--block-size", "4",
                          "--max-batched-tokens", "8", "--dtype", "float32", "--kv-cache-memory", "1MiB")
    try:
        prompt = " ".join(words[3:63])  # 60 tokens: past the budget during the chunked prefill already
        out = server.client().completions.create(model=path.name, prompt=prompt, max_tokens=40, temperature=0)
        assert out.usage.prompt_tokens == 60 and out.usage.completion_tokens == 40
        m = server.metrics()
        assert m["mlc:kv_evicted_positions_total"] == 60 + 39 - 16
        assert m["mlc:kv_cache_free_blocks"] == m["mlc:kv_cache_total_blocks"]
    finally:
        assert server.stop() == 0
