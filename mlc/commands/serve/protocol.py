"""The OpenAI request bodies as pydantic models, validated by FastAPI at the HTTP edge.

Every accepted field has a type and a range here; any other field is refused (extra="forbid"), and a
JSON null counts as absent. Strict mode: a string is not a number and true is not 1. Unions whose
members would each report their own error (prompt, stop, content, logit_bias) report one error at the
field instead, so `error.param` names what the client sent. What needs the loaded model (token ids
below the vocabulary size, the context length) is checked by the routes before the engine sees it.
api.validation_error turns pydantic's errors into one OpenAI-shaped 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WrapValidator, model_validator
from pydantic_core import PydanticCustomError

from mlc.kernels.sampling import SamplingParams

MAX_LOGPROBS = 20
MAX_N = 64
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI's embeddings endpoint


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ApiError.TYPES.get(status, "error"), "param": param, "code": code or status}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _one_error(message: str) -> WrapValidator:
    """Validate a union field as a whole: any failure is one error at the field itself, not one per union member."""

    def wrap(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValueError:  # pydantic's ValidationError is a ValueError
            raise PydanticCustomError("invalid_value", message) from None

    return WrapValidator(wrap)


Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
MinP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]
def _integral(value: Any) -> Any:
    """3.0 as 3: JSON Schema counts a number with no fraction as an integer, and so does this server (not "3" or true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int(**constraints: int) -> Any:
    # The constraints go inside the before-validator, so the published schema carries them as minimum/maximum.
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


TokenId = _int(ge=0)
PositiveInt = _int(ge=1)
NumChoices = _int(ge=1, le=MAX_N)
NumLogprobs = _int(ge=0, le=MAX_LOGPROBS)
Seed = _int(ge=-(1 << 63), le=(1 << 63) - 1)
TopK = _int(ge=-1)
Text = Annotated[str, Field(min_length=1)]
Prompt = Annotated[
    Union[Text, Annotated[list[Text], Field(min_length=1)], Annotated[list[TokenId], Field(min_length=1)],
          Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]],
    _one_error("must be a non-empty string, a list of such strings, a non-empty list of token ids (integers >= 0) or a list of such lists"),
]
Stop = Annotated[Union[Text, list[Text]], _one_error("must be a non-empty string or a list of non-empty strings")]
LogitBias = Annotated[
    dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}$")], Bias],
    _one_error("must map token ids (integers >= 0, as strings) to numbers from -100 to 100"),
    Field(json_schema_extra={"additionalProperties": False}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Request(_Strict):
    """A top-level request body: JSON nulls are dropped, so they count as absent."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]


class _Sampling(_Request):
    """Fields common to completions and chat completions (OpenAI's, then vLLM's extensions)."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: NumChoices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    top_k: TopK = Field(0, description="0 or -1: no limit")
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = []

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def sampling_params(self, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(0, self.top_k), min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self.bias, seed=self.seed, logprobs=logprobs,
        )


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: PositiveInt = 16
    echo: bool = False
    logprobs: NumLogprobs | None = None
    best_of: NumChoices | None = Field(None, description="must equal n (no best-of ranking)")
    suffix: str | None = Field(None, description="not supported: a non-empty suffix is refused")

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return [p] if isinstance(p[0], int) else list(p)  # type: ignore[list-item]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


Content = Annotated[Union[str, list[TextPart]], _one_error("must be a string or a list of text parts ({type: text, text})")]


class _Message(_Strict):
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content (parts joined), developer as system."""
        content = getattr(self, "content", None)
        text = content if isinstance(content, str) else "".join(p.text for p in content or [])
        out = self.model_dump(exclude_none=True, exclude={"content"})
        return {**out, "role": "system" if out["role"] == "developer" else out["role"], "content": text}


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="letters, digits, _ and - (as OpenAI)")
    description: str | None = None
    parameters: dict[str, Any] = {"type": "object"}
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    tools: list[Tool] | None = Field(None, min_length=1)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description="auto (the default with tools): calls parsed from the output; required or a named function: forced "
        "by a grammar; none: no calls"
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")


class TokenizeRequest(_Request):
    """Either prompt (text) or messages (a chat, rendered by the model's template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


EmbeddingInput = Annotated[
    Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)], Annotated[list[TokenId], Field(min_length=1)],
          Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]],
    _one_error(f"must be a non-empty string, a list of up to {MAX_EMBEDDING_INPUTS} such strings, a non-empty list of token ids "
               "(integers >= 0) or a list of such lists"),
]


class EmbeddingRequest(_Request):
    """OpenAI embeddings: each input's last hidden state, mean-pooled over its tokens and L2-normalised."""

    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = Field(None, description="must equal the model's hidden size (no truncation)")
    user: str | None = None

    @property
    def inputs(self) -> list[str | list[int]]:
        p = self.input
        if isinstance(p, str):
            return [p]
        return [p] if isinstance(p[0], int) else list(p)  # type: ignore[list-item]


class LoadLoraRequest(_Request):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: Text
    lora_path: Text = Field(description="a PEFT adapter directory or a run reference (run:<id>)")


class UnloadLoraRequest(_Request):
    lora_name: Text
    lora_int_id: int | None = Field(None, description="accepted for vLLM's clients and not used")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def param_path(loc: tuple[Any, ...], body: Any, missing: bool, discriminator: str | None = None) -> str | None:
    """The field a pydantic error location names, as OpenAI writes it (`messages[0].content`).

    Location parts that are not keys or indices of the request body (union member and validator
    labels) are dropped; a missing field's own name is kept, and so is the discriminator (`role`)
    of a union that matched no member.
    """
    parts: list[str] = []
    node = body
    for i, key in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            parts.append(f"[{key}]")
            node = node[key]
        elif isinstance(key, str) and isinstance(node, dict) and key in node:
            parts.append(("." if parts else "") + key)
            node = node[key]
        elif isinstance(key, str) and last and missing and isinstance(node, dict):
            parts.append(("." if parts else "") + key)
    if discriminator:
        parts.append(("." if parts else "") + discriminator)
    return "".join(parts) or None
