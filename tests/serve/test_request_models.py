"""Property tests (hypothesis) of the request models against hand-written rules of what each field accepts.

Each rule below is written from the API documentation (OpenAI's, with vLLM's extensions), not from the models;
the models must accept a value exactly when the rule does, and every refusal must become one 400 that names a
place in the request that exists (or the missing field)."""

from __future__ import annotations

import math

import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mlc.commands.serve.api import validation_error
from mlc.commands.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
BASE = {"model": "m", "prompt": "Hello"}


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(v) -> bool:
    return number(v) and float(v).is_integer()


def in_range(lo, hi, lo_open=False):
    return lambda v: number(v) and (lo < v if lo_open else lo <= v) and v <= hi


# field: the rule for a value that is present and not null (null means absent: always fine)
RULES = {
    "temperature": in_range(0, 2),
    "top_p": in_range(0, 1, lo_open=True),
    "min_p": in_range(0, 1),
    "presence_penalty": in_range(-2, 2),
    "frequency_penalty": in_range(-2, 2),
    "repetition_penalty": in_range(0, 100, lo_open=True),
    "max_tokens": lambda v: integer(v) and v >= 1,
    "n": lambda v: integer(v) and 1 <= v <= 64,
    "top_k": lambda v: integer(v) and v >= -1,
    "logprobs": lambda v: integer(v) and 0 <= v <= 20,
    "seed": lambda v: integer(v) and -(2**63) <= v < 2**63,
    "stream": lambda v: isinstance(v, bool),
    "echo": lambda v: isinstance(v, bool),
    "ignore_eos": lambda v: isinstance(v, bool),
    "user": lambda v: isinstance(v, str),
    "stop": lambda v: (isinstance(v, str) and v != "") or (isinstance(v, list) and all(isinstance(s, str) and s for s in v)),
    "stop_token_ids": lambda v: isinstance(v, list) and all(integer(t) and t >= 0 for t in v),
    "logit_bias": lambda v: isinstance(v, dict) and all(k.isascii() and k.isdigit() and len(k) <= 12 and in_range(-100, 100)(b) for k, b in v.items()),
    "prompt": lambda v: (isinstance(v, str) and v != "")
    or (isinstance(v, list) and v != [] and (
        all(isinstance(p, str) and p for p in v)
        or all(integer(t) and t >= 0 for t in v)
        or all(isinstance(p, list) and p and all(integer(t) and t >= 0 for t in p) for p in v))),
}
# Numbers near every bound of the rules (hypothesis favours a range's ends), and anywhere.
NUMBERS = st.one_of(st.floats(-3, 3), st.integers(-3, 130), st.floats(-3, 130), st.integers(-(2**65), 2**65), st.floats(),
                    st.sampled_from([0, 1, 2, -1, 0.5, 1.0, 2.0, 2.5, -2.5, 20, 21, 64, 65, 100, 100.5, 2**63, -(2**63) - 1]))
VALUES = st.one_of(JSON, NUMBERS, st.lists(st.one_of(NUMBERS, st.text(max_size=3)), max_size=3),
                   st.dictionaries(st.text("0123456789-x", max_size=13), NUMBERS, max_size=3))


def refusal(model, body):
    """The 400 the server would answer for body (None if the model accepts it)."""
    try:
        model.model_validate(body)
        return None
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        return validation_error(RequestValidationError(errors, body=body))


def names_a_place_in(param: str, body: dict) -> bool:
    """param is a path of keys and indices into body; its last key may be one the body lacks (a missing field)."""
    node = body
    for part in param.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(node, list) or i >= len(node):
                return False
            node = node[i]
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return False
    return True


# The bounds in RULES: values right at them and just either side are tried for every numeric field.
BOUNDS = {"temperature": (0, 2), "top_p": (0, 1), "min_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2),
          "repetition_penalty": (0, 100), "max_tokens": (1,), "n": (1, 64), "top_k": (-1,), "logprobs": (0, 20),
          "seed": (-(2**63), 2**63 - 1)}
NEAR = (-1, -0.5, -1e-9, 0, 1e-9, 0.5, 1)


@pytest.mark.parametrize("field", sorted(RULES))
def test_a_completion_field_is_accepted_exactly_when_its_rule_says(field):
    near = [b + d for b in BOUNDS.get(field, ()) for d in NEAR] + [b + d for b in BOUNDS.get(field, ()) for d in (-1, 1)]

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(value=st.sampled_from(near) | VALUES if near else VALUES)
    def check(value):
        body = {**BASE, field: value}
        err = refusal(CompletionRequest, body)
        absent_ok = field != "prompt"  # null counts as absent; only prompt is required
        assert (err is None) == ((value is None and absent_ok) or (value is not None and RULES[field](value))), (field, value, err and err.message)
        if err is not None:
            assert err.status == 400 and err.param.split("[")[0].split(".")[0] == field, (field, value, err.param)

    check()


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(body=st.dictionaries(st.sampled_from(["model", "prompt", "messages", "tokens", "n", "stop", "logit_bias", "tools", "x", "prompt "]), JSON, max_size=5))
def test_any_json_object_is_accepted_or_refused_with_one_400_naming_a_place_in_it(body):
    for model in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest):
        err = refusal(model, body)
        if err is not None:
            assert err.status == 400 and err.message
            assert err.param is None or names_a_place_in(err.param, body), (model.__name__, body, err.param)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(body=JSON)
def test_a_body_that_is_not_an_object_is_refused_without_a_param(body):
    if isinstance(body, dict):
        return
    err = refusal(CompletionRequest, body)
    assert err is not None and err.status == 400 and err.param is None


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(key=st.text(min_size=1, max_size=12).filter(lambda k: k not in CompletionRequest.model_fields), value=JSON)
def test_an_unknown_field_is_refused_by_its_name_unless_it_is_null(key, value):
    """A null counts as absent, even for a field this server does not know (a newer client's optional field)."""
    err = refusal(CompletionRequest, {**BASE, key: value})
    if value is None:
        assert err is None
    else:
        assert err is not None and err.param == key and "not a supported parameter" in err.message


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(prompt=st.one_of(st.text(min_size=1), st.lists(st.text(min_size=1), min_size=1, max_size=3),
                        st.lists(st.integers(0, 10**6), min_size=1, max_size=5),
                        st.lists(st.lists(st.integers(0, 10**6), min_size=1, max_size=3), min_size=1, max_size=3)))
def test_an_accepted_prompt_splits_into_the_prompts_it_holds(prompt):
    req = CompletionRequest.model_validate({**BASE, "prompt": prompt})
    expected = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    assert req.prompts == expected


ROLES = ["system", "developer", "user", "assistant", "tool"]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(role=st.one_of(st.sampled_from(ROLES), st.text(max_size=6)), content=st.one_of(st.none(), st.text(max_size=5), JSON),
       tool_call_id=st.one_of(st.none(), st.text(max_size=4)))
def test_a_chat_message_is_accepted_exactly_when_its_role_and_content_fit(role, content, tool_call_id):
    msg = {"role": role}
    if content is not None:
        msg["content"] = content
    if tool_call_id is not None:
        msg["tool_call_id"] = tool_call_id
    text_parts = isinstance(content, list) and all(isinstance(p, dict) and set(p) == {"type", "text"} and p["type"] == "text"
                                                      and isinstance(p["text"], str) for p in content)
    content_ok = isinstance(content, str) or text_parts or (content is None and role == "assistant")
    ok = role in ROLES and content_ok and ((tool_call_id is not None) == (role == "tool"))
    err = refusal(ChatCompletionRequest, {"model": "m", "messages": [msg]})
    assert (err is None) == ok, (msg, err and err.message)
    if err is not None:
        assert err.param.startswith("messages[0]")
