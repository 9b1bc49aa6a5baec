"""The OpenAI API of a live `mlc serve` (SmolLM2-135M, fp32) through the official openai client."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from tests.serve.conftest import API_KEY, http

pytestmark = pytest.mark.realmodel
MODEL = "hf"  # the served name: the fixture directory's name starts with hf-


@pytest.fixture(scope="module")
def model_name(server):
    return server.client().models.list().data[0].id


def chat(server, model_name, text, **kw):
    return server.client().chat.completions.create(model=model_name, messages=[{"role": "user", "content": text}], **kw)


def sse_events(server, path, body):
    """The data payloads of an SSE response, in order (raw HTTP, to see [DONE] and every chunk)."""
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {API_KEY}")
    with urllib.request.urlopen(req, timeout=120) as r:
        lines = r.read().decode().split("\n\n")
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_greedy_chat_equals_transformers_greedy(server, model_name, smollm2_hf_model):
    for question in ["What is the capital of France?", "Write a haiku about the sea."]:
        messages = [{"role": "user", "content": question}]
        _, tokenized = http(server, "POST", "/tokenize", {"messages": messages})
        ids = torch.tensor([tokenized["tokens"]])
        with torch.no_grad():
            ref = smollm2_hf_model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
        r = server.client().chat.completions.create(model=model_name, messages=messages, max_tokens=24, temperature=0)
        from mlc.models.tokenizer import load_tokenizer

        expected = load_tokenizer(smollm2_hf_model.name_or_path).decode(ref.tolist(), skip_special_tokens=True)
        assert r.choices[0].message.content == expected
        assert r.usage.prompt_tokens == tokenized["count"] == ids.shape[1]
        # transformers stops after the first of the generation config's EOS ids and keeps it; so does usage.
        eos = smollm2_hf_model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos)
        assert r.usage.completion_tokens == len(ref)
        assert r.choices[0].finish_reason == ("stop" if int(ref[-1]) in eos else "length")


def test_completion_usage_counts_prompt_and_generated_tokens(server, model_name):
    r = server.client().completions.create(model=model_name, prompt="The three primary colours are", max_tokens=7, temperature=0,
                                           extra_body={"ignore_eos": True})
    _, tokenized = http(server, "POST", "/tokenize", {"prompt": "The three primary colours are"})
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (tokenized["count"], 7, tokenized["count"] + 7)


def test_streaming_gives_the_same_text_then_a_usage_chunk_then_done(server, model_name):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 12, "temperature": 0}
    full = chat(server, model_name, "Name a fruit.", max_tokens=12, temperature=0)
    events = sse_events(server, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == full.usage.completion_tokens
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == full.choices[0].message.content
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == full.choices[0].finish_reason
    # Through the openai client as well, completions this time.
    stream = server.client().completions.create(model=model_name, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream)
    assert streamed == server.client().completions.create(model=model_name, prompt="Once upon a time", max_tokens=10, temperature=0).choices[0].text


def test_a_stop_string_spanning_tokens_cuts_the_text_before_it(server, model_name):
    c = server.client()
    prompt = "The history of the Roman Empire"
    full = c.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0, logprobs=0)
    tokens = full.choices[0].logprobs.tokens
    i = next(i for i in range(3, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2)
    stop = tokens[i][-2:] + tokens[i + 1][:2]  # two characters from each side of a token boundary
    text = full.choices[0].text
    expected = text[: text.find(stop)]
    r = c.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert streamed == expected


def test_n_2_returns_two_choices_and_a_seed_reproduces_them(server, model_name):
    kw = dict(model=model_name, prompt="My favourite animal is", max_tokens=12, temperature=1.0, n=2, seed=7, extra_body={"ignore_eos": True})
    a = server.client().completions.create(**kw)
    b = server.client().completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.choices[0].text != a.choices[1].text  # the siblings draw from different streams
    assert [ch.finish_reason for ch in a.choices] == ["length", "length"]
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (len(http(server, "POST", "/tokenize", {"prompt": kw["prompt"]})[1]["tokens"]), 24)


def test_chat_logprobs_match_transformers_log_softmax(server, model_name, smollm2_hf_model):
    messages = [{"role": "user", "content": "Say hello."}]
    r = server.client().chat.completions.create(model=model_name, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    first = r.choices[0].logprobs.content[0]
    _, tokenized = http(server, "POST", "/tokenize", {"messages": messages})
    with torch.no_grad():
        ref = torch.log_softmax(smollm2_hf_model(torch.tensor([tokenized["tokens"]])).logits[0, -1], -1)
    top = torch.topk(ref, 3)
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-3)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert first.top_logprobs[0].token == first.token


@pytest.mark.slow
def test_a_seeded_request_gives_the_same_text_alone_and_under_load(server, model_name):
    kw = dict(model=model_name, prompt="In the morning I like to", max_tokens=16, temperature=0.9, seed=1234)
    alone = server.client().completions.create(**kw).choices[0].text
    with ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(server.client().completions.create, model=model_name, prompt=f"Noise {i}: the", max_tokens=16, temperature=1.0) for i in range(6)]
        mine = pool.submit(server.client().completions.create, **kw)
        loaded = mine.result().choices[0].text
        [f.result() for f in noise]
    assert loaded == alone


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}


def valid(obj) -> bool:
    """SCHEMA, checked by hand."""
    return (
        isinstance(obj, dict) and set(obj) == {"name", "age", "colour"}
        and isinstance(obj["name"], str) and len(obj["name"]) <= 16
        and isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
        and obj["colour"] in ("red", "green", "blue")
    )


@pytest.mark.slow
def test_json_schema_and_json_object_outputs_always_parse_and_validate(server, model_name):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat, server, model_name, "Describe a person.", max_tokens=80, temperature=1.0, seed=s, response_format=fmt) for s in range(4)]
        results = [f.result() for f in futures]
    for r in results:
        assert r.choices[0].finish_reason == "stop"
        assert valid(json.loads(r.choices[0].message.content)), r.choices[0].message.content
    r = chat(server, model_name, "Return a JSON object with your name.", max_tokens=100, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.mark.slow
def test_a_forced_tool_call_returns_arguments_that_match_the_function_schema(server, model_name):
    """On SmolLM2's own template, which has no tool support: the tools reach the model in mlc's fallback system prompt."""
    c = server.client()
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kw = dict(model=model_name, messages=msgs, tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False, max_tokens=60, temperature=0)
        r = c.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        call = r.choices[0].message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
        chunks = list(c.chat.completions.create(stream=True, **kw))
        parts = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        assert {tc.index for tc in parts} == {0} and parts[0].function.name == "get_weather"
        assert json.loads("".join(tc.function.arguments or "" for tc in parts)) == args
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def error_of(call):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body


def test_each_bad_request_gets_its_openai_shaped_error(server, model_name):
    c = server.client()
    msgs = [{"role": "user", "content": "hi"}]
    status, body = error_of(lambda: c.chat.completions.create(model=model_name, messages=msgs, extra_body={"frobnicate": 1}))
    assert status == 400 and body["param"] == "frobnicate" and body["type"] == "invalid_request_error"
    status, body = error_of(lambda: c.chat.completions.create(model=model_name, messages=msgs, temperature=5))
    assert status == 400 and body["param"] == "temperature"
    status, body = error_of(lambda: c.completions.create(model=model_name, prompt="word " * 1100, max_tokens=5))
    assert status == 400 and body["code"] == "context_length_exceeded"
    status, body = error_of(lambda: c.chat.completions.create(model=model_name, messages=msgs, tools=[{"type": "function", "function": {"name": "f"}}],
                                                              tool_choice={"type": "function", "function": {"name": "g"}}))
    assert status == 400 and body["param"] == "tool_choice"  # a function that is not in tools
    status, body = error_of(lambda: c.chat.completions.create(model="no-such-model", messages=msgs))
    assert status == 404 and body["code"] == "model_not_found"
    for key in (None, "wrong-key"):
        status, body = http(server, "POST", "/v1/chat/completions", {"model": model_name, "messages": msgs}, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert http(server, "GET", "/health", key=None)[0] == 200  # health and metrics need no key
    status, body = http(server, "POST", "/detokenize", {"tokens": [9999999]})
    assert status == 400


@pytest.mark.slow
def test_32_concurrent_greedy_streams_equal_each_request_alone(server, model_name):
    prompts = [f"Fact {i}: the number {i * 7} is" for i in range(32)]

    def run(p):
        stream = server.client().completions.create(model=model_name, prompt=p, max_tokens=8, temperature=0, stream=True, logprobs=0)
        return [tok for ch in stream if ch.choices and ch.choices[0].logprobs for tok in ch.choices[0].logprobs.tokens]

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, prompts))
    assert http(server, "POST", "/reset_prefix_cache")[0] == 200  # alone means alone: no KV from the batch
    alone = [run(p) for p in prompts]
    assert together == alone and all(t for t in alone)


def finished_counts(server) -> dict[str, float]:
    return {r: server.metrics(finished_reason=r)["vllm:request_success_total"] for r in ("stop", "length", "abort", "error")}


@pytest.mark.slow
def test_no_kv_blocks_leak_after_a_burst_with_random_disconnects(server, model_name):
    rng = random.Random(0)
    total = server.metrics()["mlc:kv_cache_total_blocks"]
    before = finished_counts(server)
    cuts = [rng.choice([None, 1, 3, 8]) for _ in range(20)]
    lengths = [rng.randint(1, 40) for _ in range(20)]

    def one(i):
        c = server.client(timeout=60)
        stream = c.completions.create(model=model_name, prompt=f"Story {i}: " + "once " * lengths[i], max_tokens=24, temperature=1.0, stream=True)
        for k, _ in enumerate(stream):
            if cuts[i] is not None and k >= cuts[i]:
                stream.close()  # the client walks away mid-stream
                break

    def impatient(i):
        try:  # a non-streaming client that gives up before the answer
            server.client(timeout=0.3).completions.create(model=model_name, prompt=f"Essay {i}:", max_tokens=40, extra_body={"ignore_eos": True})
        except openai.APITimeoutError:
            pass

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(20)] + [pool.submit(impatient, i) for i in range(4)]
        [f.result() for f in futures]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            break
        time.sleep(0.2)
    m = server.metrics()
    assert m["mlc:kv_cache_free_blocks"] == total and m["vllm:kv_cache_usage_perc"] == 0
    done = {r: n - before[r] for r, n in finished_counts(server).items()}
    assert sum(done.values()) == 24 and done["error"] == 0  # each request counted once, under one reason
    assert done["abort"] >= 4  # at least the 4 impatient clients (40 tokens never come in 0.3 s here)
    assert done["stop"] + done["length"] >= cuts.count(None)  # every stream read to its end finished normally
    assert m["vllm:prefix_cache_queries_total"] > 0
