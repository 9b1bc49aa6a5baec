"""OpenAI request validation: every accepted field is checked here, every other field is a 400 naming it.

The HTTP boundary is where user input is validated (STYLE.md); the engine trusts what comes out.
A hand-written table beats pydantic models here: OpenAI's own fields have loose unions (stop as a
string or a list, prompt as text, texts or token ids) and the error must name the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlc.kernels.sampling import SamplingParams


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"), "param": self.param, "code": self.code or self.status}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


Check = Callable[[str, Any], Any]


def number(lo: float, hi: float) -> Check:
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise bad(name, f"must be a number from {lo} to {hi}")
        return float(v)

    return check


def integer(lo: int, hi: int) -> Check:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise bad(name, f"must be an integer from {lo} to {hi}")
        return v

    return check


def boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise bad(name, "must be true or false")
    return v


def string(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise bad(name, "must be a string")
    return v


def obj(name: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise bad(name, "must be an object")
    return v


def stop_list(name: str, v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise bad(name, "must be a string or a list of non-empty strings")
    return v


def token_ids(name: str, v: Any) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise bad(name, "must be a list of token ids")
    return v


def logit_bias(name: str, v: Any) -> dict[int, float]:
    if not isinstance(v, dict):
        raise bad(name, "must map token ids (as strings) to numbers from -100 to 100")
    out = {}
    for key, bias in v.items():
        try:
            token = int(key)
        except ValueError:
            raise bad(name, f"key {key!r} is not a token id") from None
        out[token] = number(-100, 100)(f"{name}[{key}]", bias)
    return out


def stream_options(name: str, v: Any) -> dict:
    v = obj(name, v)
    for key in v:
        if key != "include_usage":
            raise bad(f"{name}.{key}", "is not supported (only include_usage is)")
    if "include_usage" in v:
        boolean(f"{name}.include_usage", v["include_usage"])
    return v


def anything(name: str, v: Any) -> Any:
    return v


SAMPLING_FIELDS: dict[str, Check] = {
    "model": string,
    "max_tokens": integer(1, 1 << 30),
    "temperature": number(0, 2),
    "top_p": number(1e-9, 1),
    "n": integer(1, 64),
    "stream": boolean,
    "stream_options": stream_options,
    "stop": stop_list,
    "seed": integer(-(1 << 63), (1 << 63) - 1),
    "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2),
    "logit_bias": logit_bias,
    "user": string,
    "response_format": obj,
    # Extensions that vLLM also accepts.
    "top_k": integer(-1, 1 << 30),
    "min_p": number(0, 1),
    "repetition_penalty": number(1e-6, 100),
    "ignore_eos": boolean,
    "stop_token_ids": token_ids,
}

COMPLETION_FIELDS: dict[str, Check] = {
    **SAMPLING_FIELDS,
    "prompt": anything,
    "echo": boolean,
    "logprobs": integer(0, 20),
    "best_of": integer(1, 64),
    "suffix": anything,
}

CHAT_FIELDS: dict[str, Check] = {
    **SAMPLING_FIELDS,
    "messages": anything,
    "max_completion_tokens": integer(1, 1 << 30),
    "logprobs": boolean,
    "top_logprobs": integer(0, 20),
    "tools": anything,
    "tool_choice": anything,
    "parallel_tool_calls": boolean,
}


def validate(body: Any, fields: dict[str, Check]) -> dict[str, Any]:
    """The request's fields, checked; a 400 names the first unknown or invalid one. Nulls count as absent."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    out = {}
    for name, value in body.items():
        if name not in fields:
            raise bad(name, "is not a supported parameter")
        if value is not None:
            out[name] = fields[name](name, value)
    if "model" not in out:
        raise bad("model", "is required")
    return out


def sampling_params(req: dict[str, Any], logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        temperature=req.get("temperature", 1.0),
        top_p=req.get("top_p", 1.0),
        top_k=max(0, req.get("top_k", 0)),
        min_p=req.get("min_p", 0.0),
        presence_penalty=req.get("presence_penalty", 0.0),
        frequency_penalty=req.get("frequency_penalty", 0.0),
        repetition_penalty=req.get("repetition_penalty", 1.0),
        logit_bias=req.get("logit_bias", {}),
        seed=req.get("seed"),
        logprobs=logprobs,
    )


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request: text, a list of texts, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            return list(prompt)
    raise bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages with text content (a string or a list of text parts joined), checked."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(where, "must be an object with role system, developer, user, assistant or tool")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]", "only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string or a list of text parts")
        msg = {**m, "role": "system" if m["role"] == "developer" else m["role"], "content": content}
        out.append(msg)
    return out


def tool_schema(tools: Any, tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema a forced tool call must follow, or None when no call is wanted (tool_choice none).

    A call is {"name": ..., "arguments": {...}}. tool_choice "required" allows any listed function,
    {"type": "function", "function": {"name": N}} only N. "auto" would need the model's own
    tool-call syntax parsed out of free text, which differs per model: it is refused, not guessed.
    """
    if not isinstance(tools, list) or not tools:
        raise bad("tools", "must be a non-empty list of {type: function, function: {name, parameters}}")
    functions = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"tools[{i}]", "must be {type: function, function: {name, parameters}}")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
        functions[fn["name"]] = params
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        names = list(functions)
    elif isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        names = [tool_choice["function"]["name"]]
        if names[0] not in functions:
            raise bad("tool_choice", f"names function {names[0]!r}, which is not in tools")
    elif tool_choice in (None, "auto"):
        raise bad("tool_choice", "auto is not supported (tool calls are not parsed from free text); use required, a named function, or none")
    else:
        raise bad("tool_choice", "must be none, required or {type: function, function: {name}}")
    calls = [
        {"type": "object", "properties": {"name": {"const": n}, "arguments": functions[n]}, "required": ["name", "arguments"], "additionalProperties": False}
        for n in names
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}
