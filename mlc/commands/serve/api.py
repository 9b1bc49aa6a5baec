"""The OpenAI-compatible HTTP API (FastAPI routes over the engine).

Routes take the raw request and validate it with protocol.py, so that every error is the OpenAI
JSON shape with the right status and names the offending field (FastAPI's own validation answers
422 in its own shape). A request becomes one engine request per prompt; the engine thread pushes
SeqEvents into an asyncio queue, and the handler turns them into one response or an SSE stream. A
client that goes away (closed stream, or a dropped connection while waiting) aborts its engine
requests, which frees their KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from mlc.commands.serve import protocol as P
from mlc.commands.serve.engine import Engine, GenerationRequest, SeqEvent
from mlc.commands.serve.metrics import ServeMetrics
from mlc.errors import MlcError, ValidationError


@dataclass
class ServerState:
    model_name: str
    api_key: str | None = None
    max_queue: int = 256
    engine: Engine | None = None  # None while the model loads
    tokenizer: Any = None
    grammars: Any = None
    max_model_len: int = 0
    metrics: ServeMetrics | None = None
    draining: bool = False
    load_error: BaseException | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def ready(self) -> Engine:
        if self.draining:
            raise P.ApiError(503, "the server is shutting down", code="draining")
        if self.engine is None:
            raise P.ApiError(503, "the model is still loading; retry shortly", code="loading")
        if self.engine.error is not None:
            raise P.ApiError(503, f"the engine failed: {self.engine.error}", code="engine_failed")
        return self.engine


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mlc serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(P.ApiError)
    async def api_error(request: Request, exc: P.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health() -> Response:
        state.ready()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = state.metrics.render() if state.metrics is not None else ""
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request) -> Response:
        _auth(state, request)
        state.ready().reset_prefix_cache()
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _auth(state, request)
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mlc", "max_model_len": state.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        _auth(state, request)
        state.ready()
        body = await _json(request)
        if not isinstance(body, dict):
            raise P.ApiError(400, "the request body must be a JSON object")
        unknown = set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
        if unknown:
            raise P.bad(sorted(unknown)[0], "is not a supported parameter")
        _check_model(state, body.get("model"), required=False)
        if "messages" in body:
            ids = _render_chat(state, P.chat_messages(body["messages"]), body.get("add_generation_prompt", True))
        else:
            ids = state.tokenizer.encode(P.string("prompt", body.get("prompt")), add_special_tokens=body.get("add_special_tokens", True))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        _auth(state, request)
        state.ready()
        body = await _json(request)
        if not isinstance(body, dict):
            raise P.ApiError(400, "the request body must be a JSON object")
        unknown = set(body) - {"model", "tokens"}
        if unknown:
            raise P.bad(sorted(unknown)[0], "is not a supported parameter")
        _check_model(state, body.get("model"), required=False)
        ids = _check_ids(state, "tokens", P.token_ids("tokens", body.get("tokens")))
        return JSONResponse({"prompt": state.tokenizer.decode(ids)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _auth(state, request)
        engine = state.ready()
        req = P.validate(await _json(request), P.COMPLETION_FIELDS)
        _check_model(state, req["model"])
        if req.get("suffix"):
            raise P.bad("suffix", "is not supported")
        n = req.get("n", 1)
        if req.get("best_of", n) != n:
            raise P.bad("best_of", "must equal n (best-of ranking is not supported)")
        if req.get("echo") and req.get("logprobs") is not None:
            raise P.bad("echo", "echo together with logprobs is not supported (prompt logprobs are not computed)")
        tok = state.tokenizer
        prompts = [tok.encode(p) if isinstance(p, str) else _check_ids(state, "prompt", p) for p in P.completion_prompts(req.get("prompt"))]
        job = _Job(state, engine, "text_completion", req, prompts, req.get("max_tokens", 16), req.get("logprobs"))
        return await job.respond(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        _auth(state, request)
        engine = state.ready()
        req = P.validate(await _json(request), P.CHAT_FIELDS)
        _check_model(state, req["model"])
        call_schema = None
        if "tools" in req:
            call_schema = P.tool_schema(req["tools"], req.get("tool_choice"))
            if call_schema is not None and "response_format" in req:
                raise P.bad("response_format", "cannot be combined with a forced tool call")
        elif "tool_choice" in req:
            raise P.bad("tool_choice", "needs tools")
        if "top_logprobs" in req and not req.get("logprobs"):
            raise P.bad("top_logprobs", "needs logprobs: true")
        prompt = _render_chat(state, P.chat_messages(req["messages"]), True, req.get("tools"))
        if call_schema is not None:
            req["response_format"] = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": call_schema}}
            req["tool_call"] = True
        logprobs = req.get("top_logprobs", 0) if req.get("logprobs") else None
        max_tokens = req.get("max_completion_tokens", req.get("max_tokens", max(1, state.max_model_len - len(prompt))))
        job = _Job(state, engine, "chat.completion", req, [prompt], max_tokens, logprobs)
        return await job.respond(request)

    return app


def _auth(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    if not secrets.compare_digest(given.encode(), state.api_key.encode()):
        raise P.ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P.ApiError(400, f"the request body is not valid JSON: {e}") from None


def _check_model(state: ServerState, model: Any, required: bool = True) -> None:
    if model is None and not required:
        return
    if model != state.model_name:
        raise P.ApiError(404, f"model {model!r} does not exist; this server serves {state.model_name!r}", param="model", code="model_not_found")


def _check_ids(state: ServerState, name: str, ids: list[int]) -> list[int]:
    vocab = state.engine.vocab_size if state.engine is not None else 1 << 31
    if not ids or max(ids) >= vocab:
        raise P.bad(name, f"token ids must be non-empty and below the vocabulary size {vocab}")
    return ids


def _render_chat(state: ServerState, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list | None = None) -> list[int]:
    try:
        return state.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, tools=tools)
    except MlcError as e:
        raise P.bad("messages", e.message) from None


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    started: bool = False


class _Job:
    """One API request: its engine requests, their events, and the response or stream built from them."""

    def __init__(self, state: ServerState, engine: Engine, kind: str, req: dict[str, Any], prompts: list[list[int]], max_tokens: int, logprobs: int | None):
        self.state, self.engine, self.kind, self.req = state, engine, kind, req
        self.prompts, self.logprobs = prompts, logprobs
        self.n = req.get("n", 1)
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        tok = state.tokenizer
        vocab = engine.vocab_size
        if "stop_token_ids" in req:
            _check_ids(state, "stop_token_ids", req["stop_token_ids"])
        if any(t >= vocab for t in req.get("logit_bias", {})):
            raise P.bad("logit_bias", f"token ids must be below the vocabulary size {vocab}")
        for p in prompts:
            if len(p) + max_tokens > state.max_model_len:
                raise P.ApiError(
                    400,
                    f"this model's maximum context length is {state.max_model_len} tokens; the prompt has {len(p)} and "
                    f"max_tokens asks for {max_tokens} more",
                    param="max_tokens" if len(p) < state.max_model_len else "messages" if kind == "chat.completion" else "prompt",
                    code="context_length_exceeded",
                )
        grammar = None
        if "response_format" in req:
            try:
                grammar = state.grammars.grammar(req["response_format"])
            except ValidationError as e:
                raise P.bad("response_format", "; ".join(e.problems)) from None
        if engine.num_waiting >= state.max_queue:
            raise P.ApiError(429, f"the queue is full ({state.max_queue} waiting requests); retry later", code="queue_full")
        params = P.sampling_params(req, logprobs)
        self.requests = [
            GenerationRequest(
                f"{self.id}-{i}",
                p,
                params,
                max_tokens=max_tokens,
                n=self.n,
                stop=req.get("stop", []),
                stop_token_ids=req.get("stop_token_ids", []),
                ignore_eos=req.get("ignore_eos", False),
                grammar=grammar,
            )
            for i, p in enumerate(prompts)
        ]
        self.slot = {r.request_id: i for i, r in enumerate(self.requests)}
        self.choices = [_Choice() for _ in range(len(prompts) * self.n)]
        self.cached = 0  # prompt tokens found in the prefix cache
        self.tokenizer = tok
        self.queue: asyncio.Queue[SeqEvent] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def _sink(self, event: SeqEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def _submit(self) -> None:
        for r in self.requests:
            self.engine.submit(r, self._sink)

    def _abort(self) -> None:
        for r in self.requests:
            self.engine.abort(r.request_id)

    def _unfinished(self) -> bool:
        return any(c.finish_reason is None for c in self.choices)

    def _apply(self, ev: SeqEvent) -> int:
        i = self.slot[ev.request_id] * self.n + ev.index
        c = self.choices[i]
        c.text += ev.text
        c.token_ids += ev.token_ids
        c.logprobs += ev.logprobs
        if ev.finish_reason is not None:
            c.finish_reason, c.stop_reason = ev.finish_reason, ev.stop_reason
            self.cached += ev.cached_tokens if ev.index == 0 else 0
        return i

    def usage(self) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }

    async def respond(self, request: Request) -> Response:
        if self.req.get("stream"):
            return StreamingResponse(self._stream(), media_type="text/event-stream")
        self._submit()
        disconnected = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while self._unfinished():
                getter = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    self._abort()
                    return Response(status_code=499)
                self._apply(getter.result())
        finally:
            disconnected.cancel()
        if any(c.finish_reason == "abort" for c in self.choices):
            raise P.ApiError(503, "the engine failed while generating", code="engine_failed")
        return JSONResponse(self._final_body())

    def _final_body(self) -> dict[str, Any]:
        chat = self.kind == "chat.completion"
        choices = []
        for i, c in enumerate(self.choices):
            reason = c.finish_reason
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": c.text}
                if self.req.get("tool_call") and reason == "stop":
                    message, reason = {"role": "assistant", "content": None, "tool_calls": [self._tool_call(c.text)]}, "tool_calls"
                choice = {"index": i, "message": message, "finish_reason": reason, "stop_reason": c.stop_reason}
                choice["logprobs"] = {"content": self._chat_logprobs(c.logprobs)} if self.logprobs is not None else None
            else:
                text = c.text
                if self.req.get("echo"):
                    text = self.tokenizer.decode(self.prompts[i // self.n]) + text
                choice = {"index": i, "text": text, "finish_reason": reason, "stop_reason": c.stop_reason}
                choice["logprobs"] = self._completion_logprobs(c.logprobs, 0) if self.logprobs is not None else None
            choices.append(choice)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.state.model_name, "choices": choices, "usage": self.usage()}

    async def _stream(self) -> AsyncIterator[str]:
        chat = self.kind == "chat.completion"
        include_usage = bool(self.req.get("stream_options", {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"
        offsets = [0] * len(self.choices)

        def chunk(choice: dict[str, Any]) -> str:
            body = {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        self._submit()
        try:
            while self._unfinished():
                ev = await self.queue.get()
                i = self._apply(ev)
                c = self.choices[i]
                if chat:
                    if not c.started:
                        c.started = True
                        yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
                    if self.req.get("tool_call"):  # the call is sent whole, once its JSON is complete
                        if ev.finish_reason == "stop":
                            call = {"index": 0, **self._tool_call(c.text)}
                            yield chunk({"index": i, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None})
                            yield chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"})
                        elif ev.finish_reason is not None:
                            yield chunk({"index": i, "delta": {"content": c.text}, "logprobs": None, "finish_reason": ev.finish_reason})
                        continue
                    if ev.text or ev.logprobs:
                        lp = {"content": self._chat_logprobs(ev.logprobs)} if self.logprobs is not None else None
                        yield chunk({"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None})
                    if ev.finish_reason is not None:
                        yield chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason, "stop_reason": ev.stop_reason})
                else:
                    text = ev.text
                    if not c.started:
                        c.started = True
                        if self.req.get("echo"):
                            text = self.tokenizer.decode(self.prompts[i // self.n]) + text
                    lp = self._completion_logprobs(ev.logprobs, offsets[i]) if self.logprobs is not None else None
                    offsets[i] += len(text)
                    if text or ev.finish_reason is not None or lp:
                        yield chunk({"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason, "stop_reason": ev.stop_reason})
            if include_usage:
                body = {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name, "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if self._unfinished():
                self._abort()

    def _tool_call(self, text: str) -> dict[str, Any]:
        call = json.loads(text)  # the grammar guarantees {"name": ..., "arguments": {...}}
        return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _chat_logprobs(self, results: list[Any]) -> list[dict[str, Any]]:
        out = []
        for r in results:
            text = self._token_text(r.token)
            top = [{"token": self._token_text(t), "logprob": lp, "bytes": list(self._token_text(t).encode())} for t, lp in (r.top or [])]
            out.append({"token": text, "logprob": r.logprob, "bytes": list(text.encode()), "top_logprobs": top})
        return out

    def _completion_logprobs(self, results: list[Any], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for r in results:
            tokens.append(self._token_text(r.token))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [r.logprob for r in results],
            "top_logprobs": [{self._token_text(t): lp for t, lp in (r.top or [])} for r in results],
            "text_offset": offsets,
        }


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the request body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
