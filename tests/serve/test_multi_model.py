"""Several models in one server (`mlc serve A B ...`): requests routed by `model`, lazy loads, LRU unloads under
--max-memory, a model that fails to load failing alone. Two tiny random llamas of different sizes over mlc's bundled
tokenizer; each answer is checked against the same model run alone by the serving engine in this process (greedy)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from mlc.data import tiny_model_dir
from tests.conftest import save_tiny_hf_model
from tests.serve.conftest import http, start_server

PROMPTS = {"small": list(range(100, 116)), "big": list(range(300, 312))}
MAX_TOKENS = 8
SERVE = ("--dtype", "float32", "--kv-cache-memory", "1MiB", "--max-model-len", "128", "--block-size", "8")


def tiny_model(out: Path, seed: int, **shape) -> Path:
    save_tiny_hf_model("llama", out, seed=seed, vocab_size=2048, max_position_embeddings=256, **shape)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir() / name, out / name)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi")
    small = tiny_model(root / "small", 1)
    big = tiny_model(root / "big", 2, hidden_size=128, intermediate_size=192)
    broken = root / "broken"  # the small model's config over the big model's weights: loading fails on the shapes
    shutil.copytree(big, broken)
    shutil.copy(small / "config.json", broken / "config.json")
    return {"small": small, "big": big, "broken": broken}


@pytest.fixture(scope="module")
def expected(models) -> dict[str, str]:
    """Each model's greedy completion of its prompt, served alone: the serving engine (load_engine) run in this process."""
    from mlc.commands.serve.engine import GenerationRequest
    from mlc.commands.serve.server import ServeConfig, load_engine
    from mlc.kernels.sampling import SamplingParams

    out = {}
    for name in ("small", "big"):
        cfg = ServeConfig(str(models[name]), dtype="float32", block_size=8, max_model_len=128)
        engine, tokenizer, _ = load_engine(cfg, name, models[name], 1 << 20)
        tokens: list[int] = []
        engine.submit(GenerationRequest("0", PROMPTS[name], SamplingParams(temperature=0), max_tokens=MAX_TOKENS, ignore_eos=True),
                      lambda ev: tokens.extend(ev.token_ids))
        engine.run_until_idle()
        assert len(tokens) == MAX_TOKENS
        out[name] = tokenizer.decode(tokens, skip_special_tokens=True)  # as the server streams text
    assert out["small"] != out["big"]
    return out


def complete(client, model: str, prompt_of: str | None = None) -> str:
    r = client.completions.create(model=model, prompt=PROMPTS[prompt_of or model], max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.model == model and r.usage.completion_tokens == MAX_TOKENS
    return r.choices[0].text


NAMES = ("small", "big", "again", "broken")  # again: the small model's directory once more, under another name


def loaded(server) -> dict[str, float]:
    return {name: server.metrics(model_name=name).get("mlc:model_loaded", -1.0) for name in NAMES[:3]}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """small, big, again and broken in one server, with --max-memory for small and big together (not a third model)."""
    from mlc.commands.serve.footprint import footprint

    room = sum(sum(footprint(models[n], "float32", 1 << 20)) for n in ("small", "big"))
    s = start_server(models["small"], tmp_path_factory.mktemp("serve-multi"), str(models["big"]), str(models["small"]), str(models["broken"]),
                     *(a for n in NAMES for a in ("--served-model-name", n)), "--max-memory", str(room), *SERVE)
    yield s
    s.stop()


def test_each_request_goes_to_the_model_it_names_and_answers_as_that_model_alone(server, expected):
    import openai

    assert loaded(server) == {"small": 1.0, "big": 0.0, "again": 0.0}  # the first model loads at start, the others on their first request
    client = server.client()
    assert [m.id for m in client.models.list().data] == list(NAMES)
    assert complete(client, "small") == expected["small"]
    assert loaded(server)["big"] == 0.0
    assert complete(client, "big") == expected["big"]
    assert loaded(server) == {"small": 1.0, "big": 1.0, "again": 0.0}
    answers: dict[str, str] = {}  # both at once: each engine in its own thread
    threads = [threading.Thread(target=lambda n=n: answers.__setitem__(n, complete(client, n))) for n in ("big", "small", "big")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {"small": expected["small"], "big": expected["big"]}
    assert client.models.retrieve("big").id == "big"
    stream = client.completions.create(model="big", prompt=PROMPTS["big"], max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected["big"]
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "medium", prompt_of="small")
    assert "'medium' does not exist" in str(e.value) and "'small', 'big', 'again', 'broken'" in str(e.value)
    assert http(server, "GET", "/v1/models/medium")[0] == 404
    assert http(server, "POST", "/v1/completions", {"model": "big", "prompt": "hi"}, key="wrong")[0] == 401
    per_model = {n: server.metrics(model_name=n)["vllm:generation_tokens_total"] for n in ("small", "big")}
    assert per_model == {"small": 2 * MAX_TOKENS, "big": 4 * MAX_TOKENS}


def test_a_model_that_fails_to_load_fails_its_own_requests_and_the_others_keep_answering(server, expected):
    status, body = http(server, "POST", "/v1/completions", {"model": "broken", "prompt": PROMPTS["small"], "max_tokens": 2})
    assert status == 500 and body["error"]["code"] == "model_load_failed" and "shape" in body["error"]["message"]
    assert http(server, "POST", "/v1/completions", {"model": "broken", "prompt": [1, 2], "max_tokens": 2})[0] == 500  # stays failed
    assert complete(server.client(), "small") == expected["small"]
    assert complete(server.client(), "big") == expected["big"]
    assert http(server, "GET", "/health")[0] == 200


def test_when_memory_is_short_the_least_recently_used_idle_model_is_unloaded_and_answers_stay_right(server, expected):
    client = server.client()
    before = {n: server.metrics(model_name=n)["mlc:model_unloads_total"] for n in NAMES[:3]}
    complete(client, "small")
    complete(client, "big")  # small is now the least recently used
    steps = [("again", {"big", "again"}), ("small", {"again", "small"}), ("big", {"small", "big"}), ("again", {"big", "again"})]
    for name, in_memory in steps:
        assert complete(client, name, prompt_of="small" if name == "again" else None) == expected["small" if name == "again" else name]
        assert loaded(server) == {n: float(n in in_memory) for n in NAMES[:3]}, name
    after = {n: server.metrics(model_name=n)["mlc:model_unloads_total"] for n in NAMES[:3]}
    assert {n: after[n] - before[n] for n in after} == {"small": 2.0, "big": 1.0, "again": 1.0}


def test_the_run_records_every_served_model_as_an_input(models, server):
    tokens = {n: server.metrics(model_name=n).get("vllm:generation_tokens_total", 0.0) for n in NAMES}
    assert server.stop() == 0
    run = json.loads(next(server.runs_dir.glob("*serve*/run.json")).read_text())
    paths = {"small": models["small"], "big": models["big"], "again": models["small"], "broken": models["broken"]}
    assert {i["role"]: i["path"] for i in run["inputs"]} == {f"model:{n}": str(p) for n, p in paths.items()}
    assert {n: s["generation_tokens"] for n, s in run["summary"]["models"].items()} == tokens
    assert run["summary"]["generation_tokens"] == sum(tokens.values()) > 0 and tokens["broken"] == 0


def test_ambiguous_names_and_combinations_are_refused_before_anything_loads(models, run_mlc):
    small, big = str(models["small"]), str(models["big"])
    cases = [
        ((small, big, "--served-model-name", "a"), "which model it names is ambiguous"),
        ((small, big, "--served-model-name", "a", "--served-model-name", "b", "--served-model-name", "c"), "2 model(s) and 3"),
        ((small, small), "two models would be served as 'small'"),
        ((small, big, "--lora", f"x={small}"), "which model an adapter attaches to would be ambiguous"),
        ((small, big, "--replicas", "2"), "replicas serve one model"),
        ((small, big, "--engine", "vllm"), "--engine vllm serves one model"),
        ((small, big, "--max-memory", "2MiB", *SERVE), "more than --max-memory"),
        ((small, "--max-memory", "lots"), "--max-memory 'lots' is not a size"),
    ]
    for args, message in cases:
        code, out, err = run_mlc("serve", *args, "--port", "1")
        assert code != 0 and message in err, (args, err)
