"""The OpenAI-compatible HTTP API: FastAPI routes over the engine.

FastAPI validates each body against its pydantic model (protocol.py); one handler turns any
validation error into an OpenAI-shaped 400 that names the field, and every other error the API
raises is OpenAI-shaped too (401 key, 404 model or path, 413 body too large, 429 queue, 503 loading
or draining, with Retry-After). An unexpected exception in a route is a 500 with an error body and a
logged traceback, and the connection stays usable. What needs the loaded model (token ids below the
vocabulary size, the model name) is checked here; job.py turns a checked request into engine
requests and their answer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException

from mlc import __version__
from mlc.commands.serve import protocol as P
from mlc.commands.serve.engine import Engine
from mlc.commands.serve.job import Job, check_ids
from mlc.commands.serve.metrics import CONTENT_TYPE, ServeMetrics
from mlc.commands.serve.tools import chat_for_template, tool_spec
from mlc.errors import MlcError

log = logging.getLogger("mlc.serve")

class _Anything(Convertor):
    """A path parameter that may hold any character: a served model name may have slashes (org/name) or even a newline."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anything", _Anything())

ERRORS = {status: {"model": P.ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
# The largest request body read (a prompt at any context length is far smaller): a larger one is a 413, unread.
MAX_BODY_BYTES = 16 << 20


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
    jobs: set[Job] = field(default_factory=set)  # the generation requests in flight (for the drain on SIGTERM)
    record_input: Callable[..., Any] | None = None  # the run's add_input: adapters loaded at runtime go into its lineage
    allow_runtime_lora: bool = False
    runs_root: Path | None = None  # where run references (lora_path run:<id>) are looked up

    def adapters(self) -> dict[str, Any]:
        """The LoRA adapters served now, by name."""
        lora = self.engine.lora if self.engine is not None else None
        return dict(lora.adapters) if lora is not None else {}

    def ready(self) -> Engine:
        if self.draining:
            raise P.ApiError(503, "the server is shutting down; retry on another replica or after its restart", code="draining",
                             headers={"Retry-After": "1"})
        if self.engine is None:
            raise P.ApiError(503, "the model is still loading; retry shortly", code="loading", headers={"Retry-After": "5"})
        if not self.engine.healthy():
            raise P.ApiError(503, f"the engine is not running: {self.engine.error or 'its loop has stalled'}", code="engine_failed")
        return self.engine

    def abort_all(self) -> None:
        """End every request in flight now: streams get a final "abort" chunk and [DONE], others a 503."""
        for job in list(self.jobs):
            job.abort(notify=True)


class _Route(APIRoute):
    """A route whose unexpected exceptions become a 500 with an OpenAI error body (the connection stays open)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (HTTPException, RequestValidationError, P.ApiError):
                raise
            except Exception as e:  # noqa: BLE001 - a bug: answer it, log it, keep serving
                log.exception("%s %s failed", request.method, request.url.path)
                return JSONResponse(P.error_body(500, f"internal error: {type(e).__name__}"), status_code=500)

        return guarded


def validation_error(exc: RequestValidationError) -> P.ApiError:
    """The first of pydantic's errors as one 400 naming the field."""
    errors = exc.errors()
    if not errors:
        return P.ApiError(400, "the request body is not valid")
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    if loc[:1] == ("body",):
        loc = loc[1:]
    body = getattr(exc, "body", None)
    if not isinstance(body, dict):
        kind = "not valid JSON" if err.get("type") == "json_invalid" else "not a JSON object"
        return P.ApiError(400, f"the request body must be a JSON object; it is {kind}")
    tag = str((err.get("ctx") or {}).get("discriminator", "")).strip("'") if err.get("type", "").startswith("union_tag") else None
    param = P.param_path(loc, body, missing=err.get("type") == "missing", discriminator=tag)
    if err.get("type") == "extra_forbidden":
        message = "is not a supported parameter"
    elif err.get("type") == "missing":
        message = "is required"
    else:
        message = str(err.get("msg", "is not valid"))
    return P.ApiError(400, f"{param}: {message}" if param else message, param=param)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mlc serve", summary="An OpenAI-compatible API (completions, chat completions) over mlc's engine.",
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.router.route_class = _Route
    app.state.serve = state
    bearer = HTTPBearer(auto_error=False, description="--api-key, when the server was started with one")

    def auth(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if state.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), state.api_key.encode()):
            raise P.ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")

    keyed = [Depends(auth)] if state.api_key is not None else []

    @app.exception_handler(P.ApiError)
    async def api_error(request: Request, exc: P.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own: an unknown path or method, or a body it could not parse (not UTF-8, or nested too deeply).
        message = exc.detail if isinstance(exc.detail, str) else "the request is not valid"
        if exc.status_code == 400:
            message = "the request body could not be parsed: it is not UTF-8 JSON, or it is nested too deeply"
        return JSONResponse(P.error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.get("/health", responses={503: ERRORS[503]})
    async def health() -> Response:
        """200 while the engine loop runs and steps; 503 while loading, draining, or if the loop has stopped."""
        state.ready()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics with vLLM's names and labels."""
        body = state.metrics.render() if state.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)

    @app.post("/reset_prefix_cache", dependencies=keyed, responses=ERRORS)
    async def reset_prefix_cache() -> Response:
        """Forget cached prompt prefixes (benchmarks that need a cold cache)."""
        state.ready().reset_prefix_cache()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        """The server's version (mlc's), as vLLM answers it."""
        return JSONResponse({"version": __version__})

    @app.get("/v1/models", dependencies=keyed, responses=ERRORS)
    async def models() -> JSONResponse:
        cards = [_card(state, state.model_name)] + [_card(state, name) for name in state.adapters()]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/v1/models/{model_id:anything}", dependencies=keyed, responses=ERRORS)
    async def model(model_id: str) -> JSONResponse:
        """One model's card (404 for a model this server does not serve)."""
        _check_model(state, model_id)
        return JSONResponse(_card(state, model_id))

    @app.post("/v1/embeddings", dependencies=keyed, responses=ERRORS)
    async def embeddings(req: P.EmbeddingRequest) -> JSONResponse:
        """Each input's last hidden state (after the final norm), mean-pooled over its tokens and L2-normalised."""
        engine = state.ready()
        _check_model(state, req.model, adapters=False)  # embeddings come from the base model
        hidden = engine.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise P.bad("dimensions", f"must be the model's hidden size {hidden} (embeddings are not truncated)")
        inputs = [state.tokenizer.encode(p) if isinstance(p, str) else p for p in req.inputs]
        for ids in inputs:
            if not ids:
                raise P.bad("input", "an input must hold at least one token")
            check_ids(state, "input", ids)
            if len(ids) > state.max_model_len:
                raise P.ApiError(400, f"this model's maximum context length is {state.max_model_len} tokens; an input has {len(ids)}",
                                 param="input", code="context_length_exceeded")
        vectors = await _in_engine(engine, lambda: [engine.embed(ids) for ids in inputs])
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, req.encoding_format)} for i, v in enumerate(vectors)]
        tokens = sum(len(ids) for ids in inputs)
        return JSONResponse({"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/tokenize", dependencies=keyed, responses=ERRORS)
    async def tokenize(req: P.TokenizeRequest) -> JSONResponse:
        """Token ids of a prompt, or of a chat rendered by the model's template."""
        state.ready()
        _check_model(state, req.model, required=False)
        if req.prompt is None and req.messages is None:
            raise P.bad("prompt", "give prompt (text) or messages (a chat)")
        if req.prompt is not None and req.messages is not None:
            raise P.bad("messages", "give prompt or messages, not both")
        if req.messages is not None:
            ids = _render_chat(state, req.messages, req.add_generation_prompt)
        else:
            ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})

    @app.post("/detokenize", dependencies=keyed, responses=ERRORS)
    async def detokenize(req: P.DetokenizeRequest) -> JSONResponse:
        state.ready()
        _check_model(state, req.model, required=False)
        check_ids(state, "tokens", req.tokens)
        return JSONResponse({"prompt": state.tokenizer.decode(req.tokens)})

    @app.post("/v1/completions", dependencies=keyed, responses=ERRORS)
    async def completions(req: P.CompletionRequest, request: Request) -> Response:
        """OpenAI completions (streamed as server-sent events with stream: true)."""
        engine = state.ready()
        adapter = _check_model(state, req.model)
        if req.suffix:
            raise P.bad("suffix", "is not supported")
        if req.best_of is not None and req.best_of != req.n:
            raise P.bad("best_of", "must equal n (best-of ranking is not supported)")
        if req.echo and req.logprobs is not None:
            raise P.bad("echo", "echo together with logprobs is not supported (prompt logprobs are not computed)")
        prompts = [state.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts]
        for p in prompts:
            if not p:
                raise P.bad("prompt", "a prompt must hold at least one token")
            check_ids(state, "prompt", p)
        job = Job(state, engine, "text_completion", req, prompts, req.max_tokens, req.logprobs, adapter=adapter)
        return await job.respond(request)

    @app.post("/v1/chat/completions", dependencies=keyed, responses=ERRORS)
    async def chat(req: P.ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions (streamed as server-sent events with stream: true)."""
        engine = state.ready()
        adapter = _check_model(state, req.model)
        spec = None
        if req.tools is not None:
            spec = tool_spec(req.tools, req.tool_choice, req.parallel_tool_calls, state.grammars)
            if spec.schema is not None and req.response_format is not None:
                raise P.bad("response_format", "cannot be combined with a forced tool call (tool_choice required or a named function)")
        elif req.tool_choice is not None:
            raise P.bad("tool_choice", "needs tools")
        if req.top_logprobs is not None and not req.logprobs:
            raise P.bad("top_logprobs", "needs logprobs: true")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools is not None else None
        prompt = _render_chat(state, req.messages, True, tools)
        if not prompt:
            raise P.bad("messages", "the chat template rendered no tokens")
        response_format = req.response_format.model_dump(by_alias=True) if req.response_format is not None else None
        if spec is not None and spec.schema is not None:
            response_format = {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": spec.schema}}
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, state.max_model_len - len(prompt))
        job = Job(state, engine, "chat.completion", req, [prompt], max_tokens, logprobs, response_format,
                  spec if spec is not None and spec.mode != "none" else None, adapter=adapter)
        return await job.respond(request)

    if state.allow_runtime_lora:
        @app.post("/v1/load_lora_adapter", dependencies=keyed, responses=ERRORS)
        async def load_lora_adapter(req: P.LoadLoraRequest) -> JSONResponse:
            """Serve one more LoRA adapter (a PEFT directory or a run reference) under lora_name (--allow-runtime-lora)."""
            engine = state.ready()
            if req.lora_name == state.model_name or req.lora_name in state.adapters():
                raise P.bad("lora_name", f"{req.lora_name!r} is already served; unload it first")
            from mlc.commands.serve.lora import LoraSet
            from mlc.errors import InputError
            from mlc.runs.refs import resolve

            lora: LoraSet = engine.lora
            try:
                path = (await asyncio.to_thread(resolve, req.lora_path, state.runs_root or Path("runs"))).path
                adapter = await _in_engine(engine, lambda: lora.read(req.lora_name, path))
            except InputError as e:
                raise P.bad("lora_path", e.message) from None
            if req.lora_name in state.adapters():  # loaded by a concurrent request meanwhile
                raise P.bad("lora_name", f"{req.lora_name!r} is already served; unload it first")
            lora.add(adapter)
            if state.record_input is not None:  # lineage: the run lists every adapter it served
                await asyncio.to_thread(state.record_input, req.lora_path, f"lora:{req.lora_name}")
            log.info("loaded LoRA adapter %s from %s", req.lora_name, path)
            return JSONResponse({"id": req.lora_name, "object": "model", "root": str(path), "parent": state.model_name})

        @app.post("/v1/unload_lora_adapter", dependencies=keyed, responses=ERRORS)
        async def unload_lora_adapter(req: P.UnloadLoraRequest) -> JSONResponse:
            """Stop serving an adapter; requests already running with it finish with it."""
            engine = state.ready()
            if engine.lora.remove(req.lora_name) is None:
                raise P.ApiError(404, f"no LoRA adapter named {req.lora_name!r} is served", param="lora_name", code="model_not_found")
            log.info("unloaded LoRA adapter %s", req.lora_name)
            return JSONResponse({"id": req.lora_name, "object": "model", "deleted": True})

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with its 422 validation responses replaced by the 400 this server answers."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="1", summary=app.summary, routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    return app


class _BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, before parsing them.

    When Content-Length announces too much, the body is read and dropped as it arrives (memory stays
    flat, and the keep-alive connection stays in step), then the 413 goes out; a chunked body is cut
    off once it passes the limit.
    """

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than {self.limit} bytes"
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            while (event := await receive())["type"] == "http.request" and event.get("more_body"):
                pass
            await JSONResponse(P.error_body(413, message), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, message)  # FastAPI re-raises its own HTTPException from body parsing
            return event

        await self.app(scope, limited, send)


def _card(state: ServerState, model_id: str) -> dict[str, Any]:
    """A model card; an adapter's names its base model as parent and its directory as root, as vLLM's do."""
    card = {"id": model_id, "object": "model", "created": state.created, "owned_by": "mlc", "max_model_len": state.max_model_len}
    if (adapter := state.adapters().get(model_id)) is not None:
        card |= {"root": str(adapter.path), "parent": state.model_name}
    return card


async def _in_engine(engine: Engine, fn: Callable[[], Any]) -> Any:
    """fn() run in the engine thread (the one thread that runs torch), awaited here; its exception is raised here."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def done(result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        if not loop.is_closed():
            loop.call_soon_threadsafe(settle)

    engine.call(fn, done)
    return await future


def _encode_vector(v: Any, encoding: str) -> Any:
    """A vector as JSON floats, or as OpenAI's base64 of little-endian float32 (what the openai client asks for by default)."""
    if encoding == "base64":
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
    return v.tolist()


def _check_model(state: ServerState, model: str | None, required: bool = True, adapters: bool = True) -> Any:
    """The LoRA adapter a request's model names (None for the base model); 404 for a model this server does not serve."""
    if (model is None and not required) or model == state.model_name:
        return None
    if adapters and (adapter := state.adapters().get(model)) is not None:  # type: ignore[arg-type]
        return adapter
    names = [state.model_name, *state.adapters()] if adapters else [state.model_name]
    raise P.ApiError(404, f"model {model!r} does not exist; this server serves {', '.join(map(repr, names))}", param="model",
                     code="model_not_found")


def _render_chat(state: ServerState, messages: list[P.Message], add_generation_prompt: bool, tools: list | None = None) -> list[int]:
    chat, tools = chat_for_template(messages, tools, state.tokenizer.chat_template)
    try:
        return state.tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True, tools=tools)
    except MlcError as e:
        raise P.bad("messages", e.message) from None
    except Exception as e:  # noqa: BLE001 - the template is the model's code: any failure means it cannot render these messages
        raise P.bad("messages", f"the model's chat template cannot render them ({type(e).__name__}: {e})") from None
