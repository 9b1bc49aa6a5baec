"""schemathesis against a live `mlc serve` (a tiny random model): every operation of /openapi.json, with bodies that
follow the schema and bodies that break it. No answer may be a 5xx; afterwards /health is 200 and a greedy
completion still equals transformers' greedy tokens for the same model."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.serve.conftest import API_KEY, TINY_NAME, http

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

EXAMPLES = 40  # per operation and mode: 8 operations -> a few hundred requests
VOCAB = 49152  # SmolLM2's tokenizer, which the tiny model uses


def _in_vocab(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value > 0:
        return value % VOCAB
    if isinstance(value, list):
        return [_in_vocab(v) for v in value]
    if isinstance(value, dict):
        return {k: _in_vocab(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def api(tiny_server):
    schema = schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")
    schema.config.update(headers={"Authorization": f"Bearer {API_KEY}"}, request_timeout=120)

    @schema.hook("flatmap_body")
    def steer(context, body):
        """Half the bodies name the served model and keep their token ids inside the vocabulary (neither is in the
        schema), so the fuzzing reaches generation, not only the 404 and the vocabulary check."""
        if not isinstance(body, dict) or "model" not in body:
            return st.just(body)
        return st.sampled_from([body, {**_in_vocab(body), "model": TINY_NAME}])

    return schema


@pytest.fixture(scope="module")
def reference(tiny_chat_model):
    """A prompt and transformers' greedy continuation of it, as the text of each token."""
    from transformers import AutoModelForCausalLM

    from mlc.models.tokenizer import load_tokenizer

    prompt = [17, 250, 1043, 77, 9]
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(prompt):]
    tok = load_tokenizer(tiny_chat_model)
    return prompt, [tok.decode([t]) for t in ids.tolist()]


def greedy_token_texts(server, prompt: list[int]) -> list[str]:
    body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    status, r = http(server, "POST", "/v1/completions", body)
    assert status == 200, r
    return r["choices"][0]["logprobs"]["tokens"]


def test_a_greedy_completion_equals_transformers_before_the_fuzzing(tiny_server, reference):
    prompt, expected = reference
    assert greedy_token_texts(tiny_server, prompt) == expected


def test_no_generated_request_gets_a_5xx(api):
    """Each operation, with bodies that follow the schema and bodies that break it (Hypothesis, derandomised).

    (schemathesis' own pytest integration, from_fixture, does not run under pytest 9, so the cases are drawn here.)
    """
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8
    counts: dict[str, int] = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode, hooks=api.hooks))
            def run(case):
                response = case.call_and_validate(checks=[not_a_server_error], headers={"Authorization": f"Bearer {API_KEY}"})
                counts[f"{op.label} {response.status_code}"] = counts.get(f"{op.label} {response.status_code}", 0) + 1

            try:
                run()
            except Unsatisfiable:  # nothing to break in an operation without parameters or body
                assert mode is GenerationMode.NEGATIVE and "requestBody" not in op.definition.raw, op.label
    total = sum(counts.values())
    assert total >= 200, counts
    print(f"{total} requests:", dict(sorted(counts.items())))


def test_after_the_fuzzing_the_server_is_healthy_and_a_greedy_completion_is_unchanged(tiny_server, reference):
    assert http(tiny_server, "GET", "/health", key=None)[0] == 200
    prompt, expected = reference
    assert greedy_token_texts(tiny_server, prompt) == expected
    m = tiny_server.metrics()
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:request_success_total"] >= 10  # the fuzzing reached generation, not only the validation
