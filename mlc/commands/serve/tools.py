"""Tool calls in chat completions: tools into the prompt, tool calls out of the model's text.

The prompt side: `tools` go to the chat template (transformers' `tools=` variable), and assistant
messages with `tool_calls` (their arguments decoded to objects, as templates expect) and `role: tool`
messages go to it as they are. A template that never reads `tools` gets them in a system prompt
instead (FALLBACK_PROMPT, which asks for Hermes-style blocks); one that never mentions `tool_calls` gets
earlier calls written into the assistant's text as those blocks and tool results as a user turn of
`<tool_response>` blocks (so templates that insist on alternating user/assistant turns render them).

The output side follows vLLM's reading of tool_choice:
- "auto" (the default with tools): the model writes what it likes and calls are parsed from its text in
  the two formats chat templates teach: Hermes/Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks (text outside them is the message's content), and Llama 3's bare JSON `{"name": ...,
  "parameters": {...}}` (the whole output, after an optional <|python_tag|>, several joined by ";"; it
  must name a listed function). Anything that does not parse comes back as content, never as an error.
- "required": the output is decoded under a JSON-schema grammar (llguidance, as response_format) for an
  array of one or more {"name", "parameters"} objects, each a listed function with arguments that
  follow its schema (one call only with parallel_tool_calls false).
- a named function: the output is decoded under that function's parameters schema: it is the arguments.
- "none": the prompt is the same, the output is plain content.
Streamed, a call parsed from text goes out whole in one `delta.tool_calls` entry once it is complete; a
named function's arguments go out as they are generated. Joined, the deltas equal the unstreamed message.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mlc.commands.serve import protocol as P
from mlc.errors import ValidationError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
# A forced call is written as json.dumps writes JSON, with no other whitespace: llguidance would otherwise let a
# model spend its tokens on blanks between the tokens of the call (a small or random model does).
COMPACT = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}

FALLBACK_PROMPT = """You can call functions to answer the user. These are the functions, one JSON schema per line:
<tools>
{tools}
</tools>
To call functions, answer with one block per call, each holding a JSON object with the function's name and its arguments:
<tool_call>
{{"name": "<function name>", "arguments": {{<the arguments, as a JSON object>}}}}
</tool_call>"""


@dataclass
class ToolSpec:
    """A request's tools and tool_choice, checked: how its output is decoded and read."""

    mode: str  # auto, required, named or none
    names: list[str]
    name: str | None = None  # the named function
    parallel: bool = True
    schema: dict[str, Any] | None = None  # the forced output's JSON schema (required and named)

    def parser(self) -> ToolCallParser | None:
        """A fresh parser for one choice's output (None: the output is plain content)."""
        return {"auto": _AutoParser, "required": _RequiredParser, "named": _NamedParser}.get(self.mode, lambda _: None)(self)


def tool_spec(tools: list[P.Tool], tool_choice: Any, parallel_tool_calls: bool | None, grammars: Any) -> ToolSpec:
    """The checked spec of a request with tools; a 400 naming the field for a bad one."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.function
        if fn.name in functions:
            raise P.bad(f"tools[{i}].function.name", f"{fn.name!r} is given twice; each function needs its own name")
        _check_parameters(f"tools[{i}].function.parameters", fn.parameters, grammars)
        functions[fn.name] = fn.parameters
    parallel = parallel_tool_calls is not False
    names = list(functions)
    if tool_choice is None or tool_choice == "auto":
        return ToolSpec("auto", names, parallel=parallel)
    if tool_choice == "none":
        return ToolSpec("none", names, parallel=parallel)
    if tool_choice == "required":
        schema = _calls_schema(functions, parallel)
        _compile("tools", schema, grammars)
        return ToolSpec("required", names, parallel=parallel, schema=schema)
    name = tool_choice.function.name
    if name not in functions:
        raise P.bad("tool_choice", f"names function {name!r}, which is not in tools (they are {', '.join(map(repr, names))})")
    return ToolSpec("named", names, name=name, parallel=parallel, schema=functions[name] | COMPACT)


def _check_parameters(param: str, schema: dict[str, Any], grammars: Any) -> None:
    if schema.get("type", "object") != "object":
        raise P.bad(param, f"must be a JSON schema of type object (the function's arguments), not type {schema.get('type')!r}")
    _compile(param, schema, grammars)


def _compile(param: str, schema: dict[str, Any], grammars: Any) -> None:
    try:
        grammars.grammar({"type": "json_schema", "json_schema": {"name": "arguments", "schema": schema}})
    except ValidationError as e:
        raise P.bad(param, "; ".join(e.problems)) from None
    except (ValueError, TypeError, RuntimeError) as e:  # llguidance refuses some schemas while building the grammar
        raise P.bad(param, f"the JSON schema is not supported: {e}") from None


def _calls_schema(functions: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for tool_choice required: [{"name": a listed function, "parameters": its arguments}, ...].

    Each function's $defs (or definitions) move to the root, where the $refs inside it point.
    """
    defs: dict[str, dict[str, Any]] = {}
    calls = []
    for i, (name, parameters) in enumerate(functions.items()):
        parameters = copy.deepcopy(parameters)
        for key in ("$defs", "definitions"):
            for def_name, sub in (parameters.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(def_name, sub) != sub:
                    raise P.bad(f"tools[{i}].function.parameters", f"{key}/{def_name} differs from another function's "
                                "(with tool_choice required they share one schema): rename one")
        calls.append({"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema | defs | COMPACT


@lru_cache(maxsize=16)
def template_features(source: str) -> tuple[bool, bool]:
    """(reads `tools`, mentions `tool_calls`) of a chat template's source."""
    from jinja2 import meta

    from mlc.models.tokenizer import compile_chat_template

    if not source:
        return False, False
    try:
        variables = meta.find_undeclared_variables(compile_chat_template(source).environment.parse(source))
    except Exception:  # noqa: BLE001 - a template that does not parse fails later, when rendered, with its own error
        return False, False
    return "tools" in variables, "tool_calls" in source


def chat_for_template(messages: list[P.Message], tools: list[dict[str, Any]] | None, source: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render with a chat template: tool history decoded, and the fallbacks above where it lacks them."""
    reads_tools, reads_calls = template_features(source or "")
    out = []
    for i, message in enumerate(messages):
        m = message.for_template()
        if m.get("tool_calls"):
            m["tool_calls"] = [_history_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(m["tool_calls"])]
        out.append(m)
    if not reads_calls:
        out = _history_as_text(out)
    if tools and not reads_tools:
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
        tools = None
    return out, tools


def _history_call(param: str, call: dict[str, Any]) -> dict[str, Any]:
    """An earlier call with its arguments as an object (templates write them with tojson), as vLLM passes them."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise P.bad(f"{param}.function.arguments", "must be a JSON object encoded as a string (as the API returned it)")
    return {**call, "function": {**call["function"], "arguments": arguments}}


def _history_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier calls as <tool_call> blocks in the assistant's text; each run of tool results as one user turn."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [f"{CALL_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n{CALL_CLOSE}"
                      for c in m["tool_calls"]]
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + blocks)
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
                continue
            m = {"role": "user", "content": block, "_tool_results": True}
        out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


class ToolCallParser:
    """Reads one choice's output as content and tool calls, fed piece by piece as it is generated.

    feed() returns the delta to stream ({"content", "tool_calls"}, each only when there is some);
    afterwards `content` and `calls` are the whole message. Trailing whitespace is held back until more text
    comes, and dropped at the end of a message that made calls, so any split of the output gives the same message.
    """

    def __init__(self, spec: ToolSpec):
        self.spec = spec
        self.calls: list[dict[str, Any]] = []
        self.content = ""
        self._pending = ""
        self._delta: dict[str, Any] = {}

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """The delta to stream for the next piece of output text (final: the output ends with it)."""
        self._consume(text, final)
        if final and not self.calls:
            self._emit_text("", force=True)
        delta, self._delta = self._delta, {}
        return delta

    def message(self) -> dict[str, Any]:
        """The assistant message of a finished output."""
        if not self.calls:
            return {"role": "assistant", "content": self.content}
        return {"role": "assistant", "content": self.content or None, "tool_calls": self.calls}

    def _consume(self, text: str, final: bool) -> None:
        raise NotImplementedError

    def _emit_text(self, text: str, force: bool = False) -> None:
        text, self._pending = self._pending + text, ""
        if not force:  # trailing whitespace waits for the text after it (a call may come next instead)
            body = text.rstrip()
            text, self._pending = body, text[len(body) :]
        if not text:
            return
        self.content += text
        self._delta["content"] = self._delta.get("content", "") + text

    def _emit_call(self, name: str, arguments: str) -> None:
        if self.calls and not self.spec.parallel:
            return  # parallel_tool_calls false: the first call only
        call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": arguments}}
        self.calls.append(call)
        self._delta.setdefault("tool_calls", []).append({"index": len(self.calls) - 1, **copy.deepcopy(call)})


def _call_of(obj: Any, names: list[str] | None = None) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a parsed call object, or None when it is not one.

    names: the bare-JSON (Llama 3) form, which must name a listed function and carry its arguments, since
    a plain JSON answer could otherwise read as a call.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = "arguments" if "arguments" in obj else "parameters"
    if names is not None and (obj["name"] not in names or key not in obj):
        return None
    arguments = obj.get(key, {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


class _AutoParser(ToolCallParser):
    """tool_choice auto: Hermes/Qwen <tool_call> blocks anywhere in the text, or a Llama 3 JSON output."""

    def __init__(self, spec: ToolSpec):
        super().__init__(spec)
        self._buf = ""
        self._state = "start"  # start (only whitespace so far), text, call (inside a block), json (a Llama 3 output)

    def _consume(self, text: str, final: bool) -> None:
        self._buf += text
        while True:
            if self._state == "start":
                head = self._buf.lstrip()
                if head.startswith(("{", PYTHON_TAG)):
                    self._state = "json"
                elif head and not (PYTHON_TAG.startswith(head) and not final):
                    self._state = "text"
                elif final:
                    self._emit_text(self._buf)
                    self._buf = ""
                    return
                else:
                    return
            if self._state == "json":
                if final:
                    self._finish_json()
                return
            if self._state == "text":
                i = self._buf.find(CALL_OPEN)
                if i < 0:
                    keep = 0 if final else _partial_suffix(self._buf, CALL_OPEN)
                    self._emit_text(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return
                self._emit_text(self._buf[:i])
                self._buf, self._state = self._buf[i + len(CALL_OPEN) :], "call"
            if self._state == "call":
                j = self._buf.find(CALL_CLOSE)
                if j < 0 and not final:
                    return
                block = self._buf if j < 0 else self._buf[:j]  # an unclosed last block still counts, if its JSON is whole
                self._read_block(block, closed=j >= 0)
                self._buf, self._state = ("" if j < 0 else self._buf[j + len(CALL_CLOSE) :]), "text"
                if j < 0:
                    return

    def _read_block(self, block: str, closed: bool) -> None:
        try:
            call = _call_of(json.loads(block))
        except ValueError:
            call = None
        if call is None:
            self._emit_text(CALL_OPEN + block + (CALL_CLOSE if closed else ""))
        else:
            self._emit_call(*call)

    def _finish_json(self) -> None:
        body = self._buf.strip().removeprefix(PYTHON_TAG)
        decoder, pos, calls = json.JSONDecoder(), 0, []
        try:
            while True:
                while pos < len(body) and body[pos] in " \t\r\n;":
                    pos += 1
                if pos == len(body):
                    break
                obj, pos = decoder.raw_decode(body, pos)
                call = _call_of(obj, self.spec.names)
                if call is None:
                    raise ValueError("not a call")
                calls.append(call)
        except ValueError:
            calls = []
        if not calls:
            self._emit_text(self._buf, force=True)
        for call in calls:
            self._emit_call(*call)
        self._buf = ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that begins tag (held back: the next piece may complete it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _RequiredParser(ToolCallParser):
    """tool_choice required: a JSON array of {"name", "parameters"}, each call sent once its object is complete."""

    def __init__(self, spec: ToolSpec):
        super().__init__(spec)
        self._buf, self._pos = "", 0
        self._decoder = json.JSONDecoder()

    def _consume(self, text: str, final: bool) -> None:
        self._buf += text
        while "}" in text or final:
            pos = self._pos
            while pos < len(self._buf) and self._buf[pos] in " \t\r\n[,":
                pos += 1
            if pos >= len(self._buf) or self._buf[pos] != "{":
                break
            try:
                obj, self._pos = self._decoder.raw_decode(self._buf, pos)
            except ValueError:
                break
            if (call := _call_of(obj)) is not None:
                self._emit_call(*call)
        if final and not self.calls:  # cut off (max_tokens) before one call was whole: the text as it is
            self._emit_text(self._buf, force=True)


class _NamedParser(ToolCallParser):
    """A named function: the output is its arguments, streamed as they are generated."""

    def _consume(self, text: str, final: bool) -> None:
        if not self.calls:
            self._emit_call(self.spec.name or "", text)
        elif text:
            self.calls[0]["function"]["arguments"] += text
            self._delta.setdefault("tool_calls", []).append({"index": 0, "function": {"arguments": text}})
