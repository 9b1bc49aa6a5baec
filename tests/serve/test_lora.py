"""LoRA adapters served unfolded: greedy output of each adapter equals the model `mlc merge lora` folded it into, with
requests for the base and two adapters batched in the same steps, and the prefix cache never sharing KV across adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlc.commands.merge.lora import fold
from mlc.commands.serve.engine import Engine, EngineConfig, GenerationRequest
from mlc.commands.serve.lora import LoraBatch, LoraSet
from mlc.errors import InputError
from mlc.kernels.sampling import SamplingParams
from mlc.models import load_model
from mlc.models.transformer import fuse_projections
from tests.serve.test_engine_models import NumberTokenizer


def save_adapter(base: Path, out: Path, seed: int, targets: list[str], rslora: bool = False) -> Path:
    """A PEFT adapter with random A and B (init_lora_weights=False), saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # big enough deltas that the greedy tokens change
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_hf_model, tmp_path_factory):
    base = tiny_hf_model("llama")
    root = tmp_path_factory.mktemp("lora")
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    a = save_adapter(base, root / "a", 1, every)
    b = save_adapter(base, root / "b", 2, ["q_proj", "v_proj", "up_proj"], rslora=True)
    folded = {}
    for name, path in (("a", a), ("b", b)):
        fold(base, [path], root / f"folded-{name}")  # what `mlc merge lora BASE ADAPTER` writes
        folded[name] = root / f"folded-{name}"
    return base, {"a": a, "b": b}, folded


class CountingBatch(LoraBatch):
    """Records how many adapters each step ran together."""

    def __setattr__(self, name, value):
        if name == "groups" and value:
            self.__dict__.setdefault("seen", []).append(len(value))
        super().__setattr__(name, value)


def greedy(engine: Engine, jobs: list[tuple[list[int], object]], max_tokens: int = 10) -> list[list[int]]:
    out: dict[str, list[int]] = {}

    def sink(ev):
        out.setdefault(ev.request_id, []).extend(ev.token_ids)
        assert ev.finish_reason in (None, "length"), ev.error

    for i, (prompt, adapter) in enumerate(jobs):
        engine.submit(GenerationRequest(str(i), prompt, SamplingParams(temperature=0), max_tokens=max_tokens, ignore_eos=True,
                                        adapter=adapter), sink)
    engine.run_until_idle()
    return [out[str(i)] for i in range(len(jobs))]


def engine_for(path: Path, lora: bool = False, **config) -> Engine:
    model = load_model(path, dtype="float32")
    fuse_projections(model)  # as mlc serve does: the adapters must apply to the stacked q/k/v and gate/up
    lora_set = LoraSet(model) if lora else None
    cfg = {"num_blocks": 128, "block_size": 4, "max_batched_tokens": 256, **config}
    return Engine(model, NumberTokenizer(), EngineConfig(**cfg), lora=lora_set)


def test_each_adapter_batched_with_the_others_gives_its_folded_models_greedy_tokens(adapters):
    base, paths, folded = adapters
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (7, 13, 21)]
    engine = engine_for(base, lora=True)
    lora = engine.lora
    lora.batch = lora.batch.__class__.__new__(CountingBatch)
    LoraBatch.__init__(lora.batch)
    for module in engine.model.modules():
        if hasattr(module, "batch") and hasattr(module, "key"):
            module.batch = lora.batch
    served = {name: lora.read(name, path) for name, path in paths.items()}
    jobs = [(p, served[name] if name else None) for p in prompts for name in ("a", "b", None)]
    got = greedy(engine, jobs)
    assert max(lora.batch.seen) == 2  # the two adapters' requests ran in the same steps (with the base requests)
    expected = {None: greedy(engine_for(base), [(p, None) for p in prompts])}
    for name in ("a", "b"):
        expected[name] = greedy(engine_for(folded[name]), [(p, None) for p in prompts])
        assert expected[name] != expected[None], "the adapter should change the greedy tokens"
    for (prompt, adapter), tokens in zip(jobs, got):
        name = adapter.name if adapter is not None else None
        assert tokens == expected[name][prompts.index(prompt)], (name, prompts.index(prompt))


def test_the_prefix_cache_never_gives_an_adapter_the_base_models_keys_and_values(adapters):
    base, paths, folded = adapters
    prompt = list(range(3, 40))  # 9 full blocks of 4
    engine = engine_for(base, lora=True)
    adapter = engine.lora.read("a", paths["a"])
    plain = greedy(engine, [(prompt, None)])
    hits = engine.pool.prefix_hits
    with_a = greedy(engine, [(prompt, adapter)])
    assert engine.pool.prefix_hits == hits  # nothing reused across adapters
    assert with_a == greedy(engine_for(folded["a"]), [(prompt, None)]) != plain
    again = greedy(engine, [(prompt, adapter)])  # the same adapter does reuse its own blocks
    assert engine.pool.prefix_hits > hits and again == with_a


def test_an_adapter_for_another_model_or_of_another_kind_is_refused_with_one_line(adapters, tiny_hf_model, tmp_path):
    base, paths, _ = adapters
    other = save_adapter(tiny_hf_model("llama", hidden_size=32, intermediate_size=64), tmp_path / "other", 3, ["q_proj"])
    lora = engine_for(base, lora=True).lora
    with pytest.raises(InputError, match=r"its A and B for model.layers.0.self_attn.q_proj have shapes \[4, 32\] and \[32, 4\]"):
        lora.read("x", other)
    with pytest.raises(InputError, match="not a PEFT adapter"):
        lora.read("x", tmp_path)


@pytest.mark.slow
@pytest.mark.realmodel
def test_a_live_server_routes_by_model_name_and_loads_and_unloads_adapters_at_runtime(tiny_chat_model, tmp_path):
    """Through the openai client: --lora at start, /v1/models, load/unload at runtime, lineage in the run record."""
    import json

    import openai

    from mlc.models.tokenizer import load_tokenizer
    from tests.serve.conftest import http, start_server

    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = {"a": save_adapter(tiny_chat_model, tmp_path / "a", 1, every), "b": save_adapter(tiny_chat_model, tmp_path / "b", 2, ["q_proj", "v_proj"])}
    prompt = list(range(100, 120))
    tok = load_tokenizer(tiny_chat_model)
    expected = {None: tok.decode(greedy(engine_for(tiny_chat_model), [(prompt, None)], 8)[0])}
    for name, path in paths.items():
        fold(tiny_chat_model, [path], tmp_path / f"folded-{name}")
        expected[name] = tok.decode(greedy(engine_for(tmp_path / f"folded-{name}"), [(prompt, None)], 8)[0])
    server = start_server(tiny_chat_model, tmp_path / "serve", "--served-model-name", "base", "--dtype", "float32", "--kv-cache-memory", "32MiB",
                          "--max-model-len", "128", "--lora", f"a={paths['a']}", "--allow-runtime-lora")
    try:
        client = server.client()

        def complete(model):
            r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            assert r.model == model
            return r.choices[0].text

        cards = {m.id: m.model_dump() for m in client.models.list().data}
        assert list(cards) == ["base", "a"] and cards["a"]["parent"] == "base" and cards["a"]["root"] == str(paths["a"])
        assert complete("a") == expected["a"] and complete("base") == expected[None]
        status, body = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(tmp_path / "nowhere")})
        assert status == 400 and body["error"]["param"] == "lora_path"
        assert http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(paths["b"])})[0] == 200
        assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
        assert complete("b") == expected["b"] and complete("a") == expected["a"]
        assert http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "b"})[0] == 200
        with pytest.raises(openai.NotFoundError):
            complete("b")
    finally:
        assert server.stop() == 0
    run = json.loads(next(server.runs_dir.glob("*serve*/run.json")).read_text())
    assert {i["role"]: i["path"] for i in run["inputs"] if i["role"].startswith("lora:")} == {"lora:a": str(paths["a"]), "lora:b": str(paths["b"])}
