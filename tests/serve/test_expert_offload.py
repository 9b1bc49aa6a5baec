"""`mlc serve --expert-offload`: experts read from disk through an LRU cache give the in-memory model's output bit for bit,
the cache stays within its bytes, its counters add up, and the server answers the official client with it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mlc.commands.serve.expert_cache import ExpertCache, expert_sizes, load_offloaded
from mlc.commands.serve.server import ServeConfig, load_engine
from mlc.models import load_model
from tests.upcycle.upcycle_helpers import make_dense, upcycle

from .conftest import start_server


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral upcycled from a dense llama: 8 experts, top-3 (three summands, so their order matters), half of each
    expert re-drawn (Drop-Upcycling) so that a wrong expert changes the output."""
    from mlc import options

    root = tmp_path_factory.mktemp("offload")
    with pytest.MonkeyPatch.context() as mp:  # the upcycle's run directory goes under root
        mp.setattr(options, "_current", options.GlobalOptions(runs_dir=root / "runs"))
        out = upcycle(make_dense(root / "dense"), root / "moe", experts=8, top_k=3, drop_ratio=0.5, seed=3)
    return with_tokenizer(out)


WORDS = [f"w{i}" for i in range(128)]


def with_tokenizer(path: Path) -> Path:
    """path with a word-level tokenizer over WORDS, byte-level as llguidance needs (as in test_speculative_draft)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"\u0120" + w: i for i, w in enumerate(WORDS)}  # the byte-level form of " w"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="\u0120w0"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "\u0120w1", "unk_token": "\u0120w0"}))
    return path


def expert_calls(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(logits, expert calls) of the in-memory model: each sparse layer runs each expert its router picked once."""
    out = model(ids, output_router_logits=True)
    k = model.config.num_experts_per_tok
    return out.logits, sum(len(r.topk(k, dim=-1).indices.unique()) for r in out.router_logits)


def held_bytes(cache: ExpertCache) -> int:
    """Bytes of the expert tensors the cache holds right now, counted from the tensors themselves (reads in flight: as
    reserved), with the buffers of the expert evicted last, kept for the next read."""
    held = sum(sum(p.nbytes for p in e.module.parameters()) if e.module is not None else e.nbytes for e in cache.entries.values())
    return held + (sum(t.nbytes for t in cache.spare.tensors.values()) if cache.spare is not None else 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offloaded_logits_equal_the_in_memory_models_under_a_small_budget(moe, dtype):
    ref = load_model(moe, dtype=dtype)
    sizes = expert_sizes(moe, dtype)
    off = load_offloaded(moe, dtype, capacity=4 * sizes.expert_bytes)  # 4 of 16 experts
    cache = off.expert_cache
    peak = [0]
    get = cache.get

    def checked_get(key, protect=()):
        module = get(key, protect)
        peak[0] = max(peak[0], held_bytes(cache))
        return module

    cache.get = checked_get
    gen = torch.Generator().manual_seed(0)
    calls = 0
    with torch.no_grad():
        for n in (1, 17, 1, 1, 5):  # decode-like single tokens and prefill chunks
            ids = torch.randint(3, 128, (1, n), generator=gen)
            want, used = expert_calls(ref, ids)
            calls += used
            assert torch.equal(off(ids).logits, want)
    assert peak[0] <= cache.capacity and cache.peak_resident_bytes <= cache.capacity
    assert cache.hits + cache.misses == calls
    assert cache.evictions > 0 and cache.misses > 0
    assert cache.loaded_bytes == (cache.misses + cache.prefetched) * sizes.expert_bytes
    cache.close()


def test_lru_order_on_a_hand_made_sequence():
    reads = []

    def read(key, spare):
        reads.append((key, spare))
        return key

    cache = ExpertCache(capacity=30, expert_bytes=10, read=read, build=lambda raw: f"module {raw}", prefetch=False)
    for key in "abcad":  # a, b, c fill it; a is used again; d evicts b, the least recently used, and is read into b's memory
        cache.get(key)
    assert cache.keys() == ["c", "a", "d"] and reads == [("a", None), ("b", None), ("c", None), ("d", "b")]
    assert cache.get("b") == "module b" and cache.keys() == ["a", "d", "b"]  # c was least recent
    cache.get("d")
    assert cache.keys() == ["a", "b", "d"]
    cache.get("e", protect={"a"})  # a is protected: b goes instead
    assert cache.keys() == ["a", "d", "e"]
    assert (cache.hits, cache.misses, cache.evictions) == (2, 6, 3)
    assert cache.resident_bytes == 30 and cache.loaded_bytes == 60


def test_prefetch_reads_ahead_within_the_budget_without_evicting_protected_experts():
    cache = ExpertCache(capacity=30, expert_bytes=10, read=lambda k, spare: k, build=lambda raw: raw)
    for key in "abc":
        cache.get(key)
    assert cache.prefetch(["x", "y", "z"], protect={"a", "b"}) == 1  # only c may go; reads in flight are never evicted
    assert cache.keys() == ["a", "b", "x"] and cache.resident_bytes == 30
    assert cache.get("x") == "x" and (cache.hits, cache.prefetch_hits) == (1, 1)
    cache.close()


def engine_tokens(cfg: ServeConfig, path: Path, prompts: list[list[int]], max_tokens: int) -> tuple[dict[int, list[int]], object]:
    engine, _, _ = load_engine(cfg, "moe", path, 1 << 20)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    from mlc.commands.serve.engine import GenerationRequest
    from mlc.kernels.sampling import SamplingParams

    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), p, SamplingParams(temperature=0), max_tokens=max_tokens, ignore_eos=True),
                      lambda ev: out[int(ev.request_id)].extend(ev.token_ids))
    engine.run_until_idle()
    return out, engine


def test_the_engine_batches_offloaded_experts_into_the_same_greedy_tokens(moe, tiny_hf_model, tmp_path):
    qwen = tmp_path / "qwen2_moe"  # a shared expert, a dense layer, fused gate_up
    shutil.copytree(tiny_hf_model("qwen2_moe", num_experts=6, num_experts_per_tok=3), qwen)
    with_tokenizer(qwen)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (4, 11, 7)]
    for path in (moe, qwen):
        sizes = expert_sizes(path, "auto")
        plain = ServeConfig(str(path), max_model_len=64, max_batched_tokens=8)
        budget = sizes.other_bytes + (1 << 20) + sizes.top_k * sizes.expert_bytes  # the smallest --max-memory accepted
        offloaded = ServeConfig(str(path), max_model_len=64, max_batched_tokens=8, expert_offload=True, max_memory=str(budget))
        want, _ = engine_tokens(plain, path, prompts, 10)
        got, engine = engine_tokens(offloaded, path, prompts, 10)
        assert got == want, path
        cache = engine.model.expert_cache
        assert cache.prefetched > 0
        alone, lru_only = engine_tokens(replace(offloaded, expert_prefetch=False), path, prompts, 10)  # --no-expert-prefetch
        assert alone == want and lru_only.model.expert_cache.prefetched == 0
        assert cache.capacity == sizes.top_k * sizes.expert_bytes and cache.peak_resident_bytes <= cache.capacity
        series = engine.metrics.registry.get_sample_value
        assert series("mlc:expert_cache_misses_total", engine.metrics.labels) == cache.misses > 0
        cache.close()


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "1GiB"], "is a dense model"),
    (["--max-memory", "100KiB"], "raise --max-memory to at least"),
    ([], "--expert-offload needs --max-memory"),
])
def test_offload_on_a_dense_model_or_a_budget_below_top_k_experts_is_a_one_line_error(moe, tiny_hf_model, run_mlc, args, message):
    model = tiny_hf_model("llama") if message == "is a dense model" else moe
    code, out, err = run_mlc("serve", str(model), "--expert-offload", "--kv-cache-memory", "64KiB", "--max-model-len", "64", *args)
    assert code != 0 and message in err and "Traceback" not in err, err


@pytest.mark.slow  # a server process: about 5 s alone, more on a busy machine
def test_the_openai_client_gets_the_in_memory_models_completion_from_an_offloading_server(moe, tmp_path):
    from mlc.models.generate import generate
    from mlc.models.tokenizer import load_tokenizer

    sizes = expert_sizes(moe, "auto")
    budget = sizes.other_bytes + (256 << 10) + 4 * sizes.expert_bytes  # 4 of the 16 experts
    server = start_server(moe, tmp_path, "--expert-offload", "--max-memory", str(budget), "--kv-cache-memory", "256KiB", "--max-model-len", "64")
    try:
        prompt = " ".join(WORDS[5:15])
        reply = server.client().completions.create(model="moe", prompt=prompt, max_tokens=12, temperature=0)
        metrics = server.metrics()
    finally:
        assert server.stop() == 0
    tokenizer = load_tokenizer(moe)
    with torch.no_grad():
        expected = generate(load_model(moe), tokenizer.encode(prompt), 12, eos_token_ids=tokenizer.eos_token_ids)[0]
    assert reply.choices[0].text == tokenizer.decode(expected)
    hits, misses = metrics["mlc:expert_cache_hits_total"], metrics["mlc:expert_cache_misses_total"]
    assert misses > 0 and metrics["mlc:expert_cache_resident_bytes"] <= metrics["mlc:expert_cache_capacity_bytes"] == 4 * sizes.expert_bytes
    run = json.loads(next(server.runs_dir.glob("*serve*/run.json")).read_text())
    assert run["summary"]["expert_cache_hits"] == hits and run["summary"]["expert_cache_misses"] == misses
