"""Hostile requests against a live `mlc serve`: every entry of bad_requests.json gets its OpenAI-shaped 4xx, over one
keep-alive connection, and afterwards the server is healthy and still answers a normal request with the same tokens."""

from __future__ import annotations

import json
from http.client import HTTPConnection, HTTPException

import pytest

from tests.serve import corpus
from tests.serve.conftest import API_KEY, http

pytestmark = pytest.mark.realmodel


def send(conn: HTTPConnection, req: corpus.CorpusRequest) -> tuple[int, dict, dict]:
    conn.request("POST", req.endpoint, body=req.body, headers={"Content-Type": req.content_type, "Authorization": f"Bearer {API_KEY}"})
    r = conn.getresponse()
    raw = r.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"unparsed": raw[:200].decode(errors="replace")}
    return r.status, body, dict(r.getheaders())


def mismatch(req: corpus.CorpusRequest, status: int, body: dict) -> str | None:
    """What is wrong with the answer to req, or None."""
    if status != req.status:
        return f"{req}: status {status}, expected {req.status}: {body}"
    if status == 200:
        return None
    err = body.get("error")
    if not isinstance(err, dict) or not {"message", "type", "param", "code"} <= set(err) or not isinstance(err["message"], str):
        return f"{req}: not an OpenAI error body: {body}"
    if req.param is not corpus.UNSET and err["param"] != req.param:
        return f"{req}: param {err['param']!r}, expected {req.param!r} ({err['message']})"
    return None


def completion(server, model_name: str) -> list[int]:
    body = {"model": model_name, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 0}
    status, r = http(server, "POST", "/v1/completions", body)
    assert status == 200, r
    return r["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def model_name(server):
    return http(server, "GET", "/v1/models")[1]["data"][0]["id"]


@pytest.mark.slow
def test_every_corpus_request_gets_its_error_and_the_server_stays_well(server, model_name):
    before = completion(server, model_name)
    requests = corpus.load(model_name)
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    problems = []
    for req in requests["bad"] + requests["good"]:
        try:
            status, body, _ = send(conn, req)
        except (ConnectionError, HTTPException) as e:  # the keep-alive connection was dropped
            problems.append(f"{req}: {type(e).__name__}: {e}")
            conn.close()
            conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
            continue
        if (problem := mismatch(req, status, body)) is not None:
            problems.append(problem)
    conn.close()
    if (health := http(server, "GET", "/health", key=None)[0]) != 200:
        problems.append(f"/health answers {health} after the corpus")
    elif (after := completion(server, model_name)) != before:
        problems.append(f"a greedy completion changed after the corpus: {after} != {before}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


def test_the_corpus_covers_every_post_endpoint_the_server_publishes(server):
    status, spec = http(server, "GET", "/openapi.json", key=None)
    assert status == 200
    posts = {path for path, ops in spec["paths"].items() if "post" in ops}
    assert posts == set(corpus.load("m")["base"]), "add a base body for each new endpoint to bad_requests.json"


@pytest.mark.parametrize("killer", [
    {"prompt": "Hi", "logit_bias": {"-1": 100}},
    {"prompt": ""},
    {"prompt": [5, -1]},
])
def test_a_request_that_used_to_kill_the_engine_gets_a_400_and_the_next_one_is_served(server, model_name, killer):
    status, body = http(server, "POST", "/v1/completions", {"model": model_name, "max_tokens": 2, **killer})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert http(server, "GET", "/health", key=None)[0] == 200
    assert len(completion(server, model_name)) == 8
