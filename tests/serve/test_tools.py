"""Tool calls: the parsers on fixed strings, the prompt a chat template gets, and a live server through the openai client.

The live tests run a tiny random model over SmolLM2's tokenizer with a Qwen-style chat template (written here: tools
in a <tools> system block, calls as <tool_call> blocks, results as <tool_response> user turns). A random model never
chooses to call a tool, so "auto" is shown on its plain text (unchanged content) and on a JSON call it is made to
write by response_format; "required" and named calls are forced by the grammar, so their arguments must validate.
SmolLM2's own template (no tool support: the system-prompt fallback) is checked on its rendering here and on the real
model in test_api_live.py.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from mlc.commands.serve.tools import FALLBACK_PROMPT, ToolSpec, chat_for_template, template_features
from tests.serve.conftest import http, start_server

# --- the parsers, on fixed strings ---------------------------------------------------------------------------------

NAMES = ["get_weather", "get_time"]
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'


def parse(mode, text, piece=None, **kw):
    """(message, deltas) for text read whole, and read in pieces of `piece` characters as a stream would give it."""
    spec = ToolSpec(mode, NAMES, **kw)
    whole = spec.parser()
    whole.feed(text, final=True)
    stream = spec.parser()
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)] if piece else [text]
    deltas = [d for k, p in enumerate(pieces) if (d := stream.feed(p, final=k == len(pieces) - 1))]
    return whole.message(), deltas


def joined(deltas):
    """The message a client rebuilds from streamed deltas (content concatenated, each call's parts joined by index)."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"name": "", "arguments": ""})
            call["name"] += c.get("function", {}).get("name", "")
            call["arguments"] += c.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def calls_of(message):
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message.get("tool_calls", [])]


@pytest.mark.parametrize("piece", [1, 2, 5, None])
def test_hermes_blocks_become_calls_and_the_text_before_them_content(piece):
    text = f"Let me look.\n<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n" + '{"name": "get_time", "arguments": {}}\n</tool_call>\n'
    message, deltas = parse("auto", text, piece)
    assert message["content"] == "Let me look."  # whitespace before a call is dropped
    assert calls_of(message) == [{"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                                 {"name": "get_time", "arguments": "{}"}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in message["tool_calls"])
    assert joined(deltas) == (message["content"], calls_of(message))


@pytest.mark.parametrize("piece", [1, 3, None])
def test_llama3_json_calls_are_read_with_or_without_the_python_tag(piece):
    for text in ['{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {"tz": "UTC"}}']:
        message, deltas = parse("auto", text, piece)
        assert message["content"] is None and calls_of(message)[0] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
        assert len(calls_of(message)) == text.count('"name"')
        assert joined(deltas) == ("", calls_of(message))


@pytest.mark.parametrize("text", [
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par</tool_call> and more",  # JSON cut short
    "<tool_call>[1, 2]</tool_call>",  # not an object
    "<tool_call>{\"arguments\": {}}</tool_call>",  # no name
    "<tool_call>{\"name\": \"get_weather\", \"arguments\": [1]}</tool_call>",  # arguments not an object
    "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"a\": 1}",  # unclosed and cut short
    "{\"name\": \"Bob\", \"age\": 3}",  # a JSON answer, not a call: no listed function, no parameters
    "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}} and then some text",
    "{\"unclosed\": ",
    "Plain text with a < and <tool and <tool_call",
    "  \n ",
])
@pytest.mark.parametrize("piece", [1, 4, None])
def test_malformed_calls_come_back_as_the_plain_text(text, piece):
    message, deltas = parse("auto", text, piece)
    assert message == {"role": "assistant", "content": text}
    assert joined(deltas) == (text, [])


def test_an_unclosed_last_block_counts_when_its_json_is_whole_and_parallel_false_keeps_the_first_call():
    message, _ = parse("auto", f"<tool_call>{PARIS}")
    assert calls_of(message) == [{"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}]
    message, deltas = parse("auto", f"<tool_call>{PARIS}</tool_call><tool_call>" + '{"name": "get_time", "arguments": {}}</tool_call>', 2,
                            parallel=False)
    assert [c["name"] for c in calls_of(message)] == ["get_weather"] and len(joined(deltas)[1]) == 1


@pytest.mark.parametrize("piece", [1, 7, None])
def test_forced_outputs_read_as_vllm_writes_them(piece):
    text = '[{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "get_time", "parameters": {"tz": "CET"}}]'
    message, deltas = parse("required", text, piece)
    assert message["content"] is None
    assert calls_of(message) == [{"name": "get_weather", "arguments": '{"city": "Rome"}'}, {"name": "get_time", "arguments": '{"tz": "CET"}'}]
    assert joined(deltas) == ("", calls_of(message))
    message, deltas = parse("named", '{"city": "Rome"}', piece, name="get_weather")
    assert calls_of(message) == [{"name": "get_weather", "arguments": '{"city": "Rome"}'}]
    assert joined(deltas) == ("", calls_of(message))
    message, _ = parse("required", '[{"name": "get_weather", "parameters": {"ci', piece)  # cut off by max_tokens
    assert message == {"role": "assistant", "content": '[{"name": "get_weather", "parameters": {"ci'}


# --- the prompt ----------------------------------------------------------------------------------------------------

# A Qwen-style template (its structure, written for these tests): tools in the system turn, calls as <tool_call> blocks
# with the arguments as a JSON object, tool results as <tool_response> blocks in a user turn.
QWEN_STYLE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call functions. Their signatures:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Answer a call as <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}
{%- if loop.first or loop.previtem.role != 'tool' %}<|im_start|>user{% endif %}

<tool_response>
{{ m.content }}
</tool_response>
{%- if loop.last or loop.nextitem.role != 'tool' %}<|im_end|>
{% endif %}
{%- elif m.role != 'system' %}<|im_start|>{{ m.role }}
{{ m.content }}
{%- for call in m.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"], "additionalProperties": False}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                           "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "user", "content": "And tomorrow?"},
]


def weather_ok(args) -> bool:
    """WEATHER's schema, checked by hand."""
    return (isinstance(args, dict) and set(args) == {"city", "unit", "days"} and isinstance(args["city"], str) and len(args["city"]) <= 12
            and args["unit"] in ("C", "F") and type(args["days"]) is int and 1 <= args["days"] <= 7)


def time_ok(args) -> bool:
    return args in ({"tz": "UTC"}, {"tz": "CET"})


@pytest.fixture(scope="module")
def qwen_style_model(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-qwen-style")
    for f in tiny_chat_model.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN_STYLE}))
    return out


def messages_of(history):
    from mlc.commands.serve.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"model": "m", "messages": history}).messages


def test_a_template_with_tools_renders_them_and_the_history_as_transformers_does(qwen_style_model):
    from transformers import AutoTokenizer

    from mlc.models.tokenizer import load_tokenizer

    assert template_features(QWEN_STYLE) == (True, True)
    chat, tools = chat_for_template(messages_of(HISTORY), [WEATHER, TIME], QWEN_STYLE)
    ours = load_tokenizer(qwen_style_model).apply_chat_template(chat, tools=tools)
    # transformers gets the history as templates expect it: the call's arguments as an object.
    reference_history = json.loads(json.dumps(HISTORY))
    call = reference_history[1]["tool_calls"][0]["function"]
    call["arguments"] = json.loads(call["arguments"])
    reference_history[1]["content"] = ""
    expected = AutoTokenizer.from_pretrained(qwen_style_model).apply_chat_template(reference_history, tools=[WEATHER, TIME], tokenize=False,
                                                                                   add_generation_prompt=True)
    assert ours == expected
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C", "days": 1}}' in ours
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in ours


def test_a_template_without_tools_gets_them_in_a_system_prompt_and_the_history_as_text(tiny_chat_model):
    from mlc.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_chat_model)  # SmolLM2's own template, which knows neither tools nor tool calls
    assert template_features(tok.chat_template) == (False, False)
    chat, tools = chat_for_template(messages_of(HISTORY + [{"role": "tool", "tool_call_id": "call_2", "content": "19 C"}]),
                                    [WEATHER], tok.chat_template)
    assert tools is None
    text = tok.apply_chat_template(chat)
    system = FALLBACK_PROMPT.format(tools=json.dumps(WEATHER))
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C", "days": 1}}\n'
            "</tool_call><|im_end|>") in text
    # Consecutive tool results share one user turn (after the question that followed them, here, as sent).
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n19 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


# --- a live server through the openai client -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools_server(qwen_style_model, tmp_path_factory):
    s = start_server(qwen_style_model, tmp_path_factory.mktemp("serve-tools"), "--served-model-name", "qwenish", "--dtype", "float32",
                     "--kv-cache-memory", "64MiB", "--max-model-len", "512", "--max-queue", "16")
    yield s
    s.stop()


def ask(server, stream=False, **kw):
    """The message (as a dict), finish_reason and deltas of one chat request, streamed or not."""
    c = server.client()
    body = dict(model="qwenish", messages=[{"role": "user", "content": "Weather in Paris, please."}], tools=[WEATHER, TIME],
                max_tokens=120) | kw
    if not stream:
        choice = c.chat.completions.create(**body).choices[0]
        return choice.message.model_dump(exclude_none=True), choice.finish_reason, None
    chunks = list(c.chat.completions.create(stream=True, **body))
    deltas = [ch.choices[0].delta.model_dump(exclude_none=True) for ch in chunks if ch.choices]
    return None, chunks[-1].choices[0].finish_reason, [{k: v for k, v in d.items() if k != "role"} for d in deltas]


def test_required_and_named_tool_choice_give_calls_whose_arguments_follow_the_schema(tools_server):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice, seed in [("required", 0), (named, 1)]:
        message, reason, _ = ask(tools_server, tool_choice=tool_choice, temperature=1.0, seed=seed)
        assert reason == "tool_calls" and "content" not in message, message
        calls = calls_of(message)
        for call in calls:
            args = json.loads(call["arguments"])
            assert weather_ok(args) if call["name"] == "get_weather" else (call["name"] == "get_time" and time_ok(args)), call
        if tool_choice is named:
            assert [c["name"] for c in calls] == ["get_weather"]
        _, streamed_reason, deltas = ask(tools_server, stream=True, tool_choice=tool_choice, temperature=1.0, seed=seed)
        assert streamed_reason == "tool_calls" and joined(deltas) == ("", calls)
    message, _, _ = ask(tools_server, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=4)
    assert len(message["tool_calls"]) == 1


def test_auto_returns_plain_text_unchanged_and_reads_a_json_call_the_model_writes(tools_server):
    plain, reason, _ = ask(tools_server, tool_choice="none", temperature=0, max_tokens=16)
    auto, auto_reason, deltas = ask(tools_server, temperature=0, max_tokens=16)  # tool_choice auto is the default with tools
    assert auto == plain and "tool_calls" not in auto and auto_reason == reason
    assert joined(ask(tools_server, stream=True, temperature=0, max_tokens=16)[2]) == (plain["content"], [])
    # Made to write a Llama 3 style call (a JSON object with name and parameters) by response_format, auto reads it as one.
    call_schema = {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER["function"]["parameters"]},
                   "required": ["name", "parameters"], "additionalProperties": False,
                   "x-guidance": {"whitespace_flexible": False}}  # no blanks for a random model to fill max_tokens with
    fmt = {"type": "json_schema", "json_schema": {"name": "call", "schema": call_schema}}
    message, reason, _ = ask(tools_server, tool_choice="auto", response_format=fmt, temperature=1.0, seed=5)
    assert reason == "tool_calls" and [c["name"] for c in calls_of(message)] == ["get_weather"]
    assert weather_ok(json.loads(message["tool_calls"][0]["function"]["arguments"]))
    _, reason, deltas = ask(tools_server, stream=True, tool_choice="auto", response_format=fmt, temperature=1.0, seed=5)
    assert reason == "tool_calls" and joined(deltas) == ("", calls_of(message))


def test_a_history_with_tool_calls_and_results_is_answered(tools_server):
    r = tools_server.client().chat.completions.create(model="qwenish", messages=HISTORY, tools=[WEATHER], tool_choice="required",
                                                      max_tokens=120, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls" and weather_ok(json.loads(r.choices[0].message.tool_calls[0].function.arguments))
    # The history reached the template: the prompt holds the earlier call and its result.
    _, tokens = http(tools_server, "POST", "/tokenize", {"model": "qwenish", "messages": HISTORY})
    _, text = http(tools_server, "POST", "/detokenize", {"model": "qwenish", "tokens": tokens["tokens"]})
    assert '"arguments": {"city": "Paris", "unit": "C", "days": 1}}' in text["prompt"] and "18 C, sunny" in text["prompt"]


@pytest.mark.parametrize("change, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_moon"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}]},
     "tools[0].function.parameters"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": None, "tool_choice": "auto"}, "tool_choice"),  # tool_choice without tools (a null is an absent field)
    ({"messages": [HISTORY[0], {**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": "{city"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_a_bad_tool_request_gets_a_400_naming_the_field(tools_server, change, param):
    body = {"model": "qwenish", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "max_tokens": 2, **change}
    with pytest.raises(openai.BadRequestError) as e:
        tools_server.client().chat.completions.create(**body)
    assert e.value.body["param"] == param, e.value.body


def test_the_required_grammar_accepts_exactly_the_calls_that_follow_the_schemas(tiny_chat_model):
    """Checked on llguidance itself: vLLM's call array, compact, each function's $defs moved to the root where its $refs point."""
    from mlc.commands.serve.protocol import Tool
    from mlc.commands.serve.structured import GrammarFactory
    from mlc.commands.serve.tools import tool_spec
    from mlc.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_chat_model)
    grammars = GrammarFactory(tok.backend.to_str(), tok.vocab_size, tok.eos_token_ids)
    place = {"type": "object", "properties": {"at": {"$ref": "#/$defs/city"}}, "required": ["at"], "additionalProperties": False,
             "$defs": {"city": {"enum": ["Paris", "Rome"]}}}
    tools = [Tool.model_validate(t) for t in (TIME, {"type": "function", "function": {"name": "visit", "parameters": place}})]
    spec = tool_spec(tools, "required", None, grammars)
    grammar = grammars.grammar({"type": "json_schema", "json_schema": {"name": "calls", "schema": spec.schema}})

    def accepted(text):
        matcher = grammars.matcher(grammar)
        ids = tok.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    assert accepted('[{"name": "visit", "parameters": {"at": "Rome"}}, {"name": "get_time", "parameters": {"tz": "UTC"}}]')
    for wrong in ['[]', '[{"name": "visit", "parameters": {"at": "Oslo"}}]', '[{"name": "get_date", "parameters": {}}]',
                  '[{"name": "get_time", "parameters": {"tz": "UTC", "x": 1}}]', '[{"name":"get_time","parameters":{"tz":"UTC"}}]',
                  '{"name": "get_time", "parameters": {"tz": "UTC"}}']:
        assert not accepted(wrong), wrong
    one = tool_spec(tools, "required", False, grammars).schema
    single = grammars.grammar({"type": "json_schema", "json_schema": {"name": "calls", "schema": one}})
    matcher = grammars.matcher(single)
    two = tok.encode('[{"name": "get_time", "parameters": {"tz": "UTC"}}, {"name"', add_special_tokens=False)
    assert matcher.try_consume_tokens(two) < len(two)  # parallel_tool_calls false: one call only
