"""Several models behind one server (`mlc serve A B ...`): each request goes to the engine of the model it names.

Each model is served as if alone: its own ServerState and FastAPI app (api.py, unchanged), its own engine
and engine thread (the thread that loads the weights runs the loop, as with one model). A small ASGI front
(`Front`) reads the model a request names (the JSON body's `model`; the id in /v1/models/{id}), has that model
loaded if it is not, and hands the request, its body replayed, to that model's app; it answers itself
/v1/models (every served model), /health, /metrics (one registry: each series labelled model_name) and a
404 naming the served models for any other name. The first model loads at start (/health is 503 until it
has, and the server stops if it fails, as with one model); the others load on their first request.

Memory (`--max-memory`): a model in memory holds its weights plus its own KV cache (`--kv-cache-memory`,
the same size for each). Before a load, the least-recently-used models with no request in flight are
unloaded until the new one fits; a model answering requests is never unloaded. When the memory is held by
busy models the request gets a 503 with Retry-After (the openai client retries it). A model that fails to
load, or whose engine loop dies, answers its requests with a 500 naming the error until the server
restarts; the other models are not touched.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlc import console
from mlc.commands.serve import protocol as P
from mlc.commands.serve.api import MAX_BODY_BYTES, ServerState, build_app
from mlc.commands.serve.footprint import check_fits, footprint, mib
from mlc.commands.serve.metrics import CONTENT_TYPE, FINISH_REASONS, LABELS, MetricFamilies, ServeMetrics
from mlc.commands.serve.server import ServeConfig, available_memory, default_name, parse_memory
from mlc.errors import InputError, MlcError

# The routes whose JSON body names the model; every other path goes to the first model's app (docs, /version, 404s).
BODY_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"}


@dataclass(eq=False)
class ServedModel:
    """One served model: its app and state (always there) and its engine (while loaded)."""

    name: str
    path: Path
    state: ServerState
    app: Any
    metrics: ServeMetrics
    bytes: int  # weights (from the safetensors headers, at the dtype they load in) + KV cache: what --max-memory counts
    status: str = "unloaded"  # unloaded, loading, ready, unloading, failed
    engine: Any = None  # set once the event loop has taken the load in
    thread: threading.Thread | None = None
    running: Any = None  # the engine whose loop runs in the thread (for the shutdown, which may come mid-load)
    transition: asyncio.Future | None = None  # the load or unload under way
    error: BaseException | None = None
    active: int = 0  # requests being answered
    last_used: float = 0.0


class ModelSet:
    """The served models, their memory and their loads and unloads (all decided in the event loop's thread)."""

    def __init__(self, cfg: ServeConfig, models: list[ServedModel], kv_bytes: int, max_memory: int | None, families: MetricFamilies,
                 jobs: set, on_fatal: Callable[[BaseException], None]):
        from prometheus_client import Counter, Gauge, Histogram

        self.cfg, self.models, self.kv_bytes, self.max_memory = cfg, models, kv_bytes, max_memory
        self.by_name = {m.name: m for m in models}
        self.families, self.jobs, self.on_fatal = families, jobs, on_fatal
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = False  # the first model has loaded (/health 200 from then on)
        self._stopping = False
        self._lock = threading.Lock()
        self._draining = False
        reg = families.registry
        self.loaded = Gauge("mlc:model_loaded", "1 while the model is in memory, else 0.", LABELS, registry=reg)
        self.loads = Counter("mlc:model_loads", "Loads of the model (the first, and each after an unload).", LABELS, registry=reg)
        self.unloads = Counter("mlc:model_unloads", "Unloads of the model to make room for another (--max-memory).", LABELS, registry=reg)
        self.load_time = Histogram("mlc:model_load_seconds", "Time to load the model (weights and KV cache).", LABELS, registry=reg,
                                   buckets=[0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300])
        self.unload_time = Histogram("mlc:model_unload_seconds", "Time to unload the model (its engine loop stopped, memory freed).",
                                     LABELS, registry=reg, buckets=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
        for m in models:  # every model's series from the start, at 0
            for family in (self.loaded, self.loads, self.unloads, self.load_time, self.unload_time):
                family.labels(m.name, "0")

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:  # DrainingServer's first signal
        self._draining = value
        for m in self.models:
            m.state.draining = value

    def abort_all(self) -> None:
        for job in list(self.jobs):
            job.abort(notify=True)

    # ----- in the event loop -----
    def start(self) -> None:
        """Load the first model (at server start-up)."""
        self.loop = asyncio.get_running_loop()
        self._begin_load(self.models[0])

    async def acquire(self, m: ServedModel) -> None:
        """Return once m is loaded (loading it, and unloading others, if need be); ApiError if it cannot serve."""
        while True:
            if self.draining:
                raise P.ApiError(503, "the server is shutting down; retry on another replica or after its restart", code="draining",
                                 headers={"Retry-After": "1"})
            if m.status == "ready":
                m.last_used = time.monotonic()
                return
            if m.status == "failed":
                raise P.ApiError(500, f"model {m.name!r} cannot be served: {_describe(m.error)}", code="model_load_failed")
            if m.status == "unloaded":
                self._begin_load(m)
            await asyncio.shield(m.transition)  # type: ignore[arg-type]

    def _begin_load(self, m: ServedModel) -> None:
        victims = self._make_room(m)
        for v in victims:
            v.status = "unloading"
            v.transition = asyncio.ensure_future(self._unload(v))
        waits = [x.transition for x in self.models if x.status == "unloading"]
        m.status = "loading"
        m.transition = asyncio.ensure_future(self._load(m, waits))

    def _make_room(self, m: ServedModel) -> list[ServedModel]:
        """The idle models to unload, least recently used first, so that m fits; a 503 when busy models hold the memory."""
        if self.max_memory is None:
            return []
        held = sum(x.bytes for x in self.models if x.status in ("loading", "ready"))  # unloading ones are waited for
        excess = held + m.bytes - self.max_memory
        victims = []
        for x in sorted((x for x in self.models if x.status == "ready" and x.active == 0), key=lambda x: x.last_used):
            if excess <= 0:
                break
            victims.append(x)
            excess -= x.bytes
        if excess > 0:
            busy = [x.name for x in self.models if x.status in ("loading", "ready") and x not in victims]
            raise P.ApiError(503, f"model {m.name!r} does not fit in --max-memory next to the models answering requests now "
                             f"({', '.join(map(repr, busy))}); retry shortly", code="model_memory_busy", headers={"Retry-After": "1"})
        return victims

    async def _load(self, m: ServedModel, waits: list[Any]) -> None:
        for w in waits:
            await asyncio.shield(w)
        assert self.loop is not None
        done = self.loop.create_future()
        m.thread = threading.Thread(target=self._engine_thread, args=(m, done, time.monotonic()), name=f"mlc-serve-engine-{m.name}",
                                    daemon=True)
        m.thread.start()
        await done

    async def _unload(self, m: ServedModel) -> None:
        began = time.monotonic()
        m.engine.stop()
        await asyncio.to_thread(m.thread.join)  # type: ignore[union-attr]
        self._drop(m)
        m.status = "unloaded"
        self.unloads.labels(m.name, "0").inc()
        self.unload_time.labels(m.name, "0").observe(time.monotonic() - began)
        console.info(f"unloaded {m.name} in {time.monotonic() - began:.2f} s (to make room)")

    def _drop(self, m: ServedModel) -> None:
        m.metrics.unbind_engine()
        m.state.engine = m.state.tokenizer = m.state.grammars = None
        m.engine, m.thread = None, None
        self.loaded.labels(m.name, "0").set(0)  # the last references to the engine went: reference counting frees its tensors now

    def _loaded(self, m: ServedModel, done: asyncio.Future, began: float, result: Any, error: BaseException | None) -> None:
        if error is not None:
            m.status, m.error, m.thread = "failed", error, None
            console.warn(f"model {m.name!r} failed to load: {_describe(error)}")
            if m is self.models[0] and not self.started:
                self.on_fatal(error)  # nothing served yet: stop, as a single server does
        else:
            engine, tokenizer, grammars = result
            m.engine = engine
            m.state.tokenizer, m.state.grammars, m.state.max_model_len = tokenizer, grammars, engine.config.max_model_len
            m.state.metrics, m.state.engine = m.metrics, engine
            m.metrics.bind_engine(engine)
            m.status, m.last_used = "ready", time.monotonic()
            self.started = True
            seconds = time.monotonic() - began
            self.loads.labels(m.name, "0").inc()
            self.load_time.labels(m.name, "0").observe(seconds)
            self.loaded.labels(m.name, "0").set(1)
            c = engine.config
            console.info(f"loaded {m.name} in {seconds:.2f} s ({mib(m.bytes)}: {c.num_blocks} KV blocks x {c.block_size} tokens, "
                         f"max length {c.max_model_len}, {engine.dtype})")
        if not done.done():
            done.set_result(None)

    def _ended(self, m: ServedModel, engine: Any) -> None:
        """An engine loop returned: asked to (an unload, the shutdown), or it died, which fails this model alone."""
        if engine.error is not None and m.engine is engine:
            self._drop(m)
            m.status, m.error = "failed", MlcError(f"its engine loop failed: {engine.error!r}")

    # ----- in the model's engine thread -----
    def _engine_thread(self, m: ServedModel, done: asyncio.Future, began: float) -> None:
        """Load m, then run its engine loop in this same thread (see Engine.run) until it is stopped."""
        from mlc.commands.serve.server import load_engine

        try:
            result = load_engine(self.cfg, m.name, m.path, self.kv_bytes, metrics=m.metrics)
            result[0].compile_in_background()  # with --compile (see compiling.py)
        except Exception as e:  # noqa: BLE001 - this model's requests get the error; the others are not touched
            self._call(self._loaded, m, done, began, None, e)
            return
        self._call(self._loaded, m, done, began, result, None)
        engine = result[0]
        del result
        with self._lock:
            if self._stopping:  # the server stopped while this model loaded
                return
            m.running = engine
        engine.run()
        m.running = None
        self._call(self._ended, m, engine)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop has closed: the server has stopped
            pass

    def stop(self) -> None:
        """Stop every engine loop and wait for their threads (after the server has stopped)."""
        with self._lock:
            self._stopping = True
            engines = [m.running for m in self.models if m.running is not None]
        for engine in engines:
            engine.stop()
        for m in self.models:
            if m.thread is not None:
                m.thread.join()

    def summary(self) -> dict[str, Any]:
        """Totals over the models for the run record, and each model's own summary."""
        reg = self.families.registry

        def count(name: str, m: ServedModel) -> float:
            return reg.get_sample_value(name, {"model_name": m.name, "engine": "0"}) or 0.0

        per = {m.name: m.metrics.summary() | {"loads": count("mlc:model_loads_total", m), "unloads": count("mlc:model_unloads_total", m)}
               for m in self.models}
        totals: dict[str, Any] = {}
        for key in ("requests", *(f"requests_{r}" for r in FINISH_REASONS), "prompt_tokens", "generation_tokens"):
            totals[key] = sum(s[key] for s in per.values())
        return totals | {"models": per}


class Front:
    """The ASGI app clients talk to: routes each request to its model's app (see the module's docstring)."""

    def __init__(self, models: ModelSet, api_key: str | None):
        self.models, self.api_key = models, api_key
        self.default = models.models[0]

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return await self.default.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == "/health" and method == "GET":
            return await self._health(scope, receive, send)
        if path == "/metrics" and method == "GET":
            return await _respond(scope, receive, send, 200, _render(self.models.families), CONTENT_TYPE)
        if path == "/reset_prefix_cache" and method == "POST" and self._authorized(scope):
            for m in self.models.models:
                if m.engine is not None:
                    m.engine.reset_prefix_cache()
            return await _respond(scope, receive, send, 200, b"")
        if path == "/v1/models" and method == "GET" and self._authorized(scope):
            return await _json(scope, receive, send, 200, {"object": "list", "data": [self._card(m) for m in self.models.models]})
        if path.startswith("/v1/models/") and method == "GET" and self._authorized(scope):
            m = self.models.by_name.get(path[len("/v1/models/"):])
            if m is None:
                return await self._unknown(scope, receive, send, path[len("/v1/models/"):])
            return await _json(scope, receive, send, 200, self._card(m))
        if method != "POST" or path not in BODY_ROUTES or not self._authorized(scope):
            return await self.default.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return await self.default.app(scope, receive, send)  # its body limit answers the 413
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client has gone
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body") or size > MAX_BODY_BYTES:
                break
        replay = _replay(chunks, receive, more=size > MAX_BODY_BYTES)
        if size > MAX_BODY_BYTES:
            return await self.default.app(scope, replay, send)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            body = None
        name = body.get("model") if isinstance(body, dict) else None
        if name is None or not isinstance(name, str):  # no model (optional for /tokenize), or a malformed body: as one model would answer
            m = self.default
        elif (m := self.models.by_name.get(name)) is None:
            return await self._unknown(scope, replay, send, name)
        try:
            await self.models.acquire(m)
        except P.ApiError as e:
            return await _json(scope, replay, send, e.status, e.body(), e.headers)
        m.active += 1
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done, m.last_used = True, time.monotonic()
                m.active -= 1

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finish()  # idle from its last byte on: a client's next request may come before this coroutine unwinds
            await send(message)

        try:
            await m.app(scope, replay, send_tracked)
        finally:
            finish()

    async def _lifespan(self, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.models.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _health(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """200 once the first model has loaded, unless draining; one model's failure is answered on its own requests."""
        if self.models.draining:
            e = P.ApiError(503, "the server is shutting down; retry on another replica or after its restart", code="draining",
                           headers={"Retry-After": "1"})
        elif not self.models.started:
            e = P.ApiError(503, "the model is still loading; retry shortly", code="loading", headers={"Retry-After": "5"})
        else:
            return await _respond(scope, receive, send, 200, b"")
        return await _json(scope, receive, send, e.status, e.body(), e.headers)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        """True without --api-key or with the right bearer token; otherwise the request goes to a model's app, which answers 401."""
        if self.api_key is None:
            return True
        given = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    def _card(self, m: ServedModel) -> dict[str, Any]:
        """OpenAI's model object; vLLM's max_model_len once the model is loaded (it depends on the loaded KV cache)."""
        card = {"id": m.name, "object": "model", "created": m.state.created, "owned_by": "mlc"}
        if m.status == "ready":
            card["max_model_len"] = m.state.max_model_len
        return card

    async def _unknown(self, scope: dict[str, Any], receive: Any, send: Any, name: str) -> None:
        names = ", ".join(repr(m.name) for m in self.models.models)
        e = P.ApiError(404, f"model {name!r} does not exist; this server serves {names}", param="model", code="model_not_found")
        await _json(scope, receive, send, 404, e.body())


def _describe(e: BaseException | None) -> str:
    return e.one_line() if isinstance(e, MlcError) else f"{type(e).__name__}: {e}"


def _render(families: MetricFamilies) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(families.registry)


def _replay(chunks: list[bytes], receive: Callable[[], Awaitable[dict]], more: bool) -> Callable[[], Awaitable[dict]]:
    """A receive that hands over the body read so far as one message, then the client's own messages."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": more}
        return await receive()

    return replay


async def _respond(scope: Any, receive: Any, send: Any, status: int, body: bytes, media_type: str | None = None,
                   headers: dict[str, str] | None = None) -> None:
    from starlette.responses import Response

    await Response(body, status_code=status, media_type=media_type, headers=headers)(scope, receive, send)


async def _json(scope: Any, receive: Any, send: Any, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


def served_models(cfg: ServeConfig) -> list[tuple[str, str]]:
    """[(served name, model reference)] in the order given; InputError for a name count that does not match, or a name used twice."""
    refs = [cfg.model, *cfg.more_models]
    given = ([cfg.served_model_name] if cfg.served_model_name else []) + list(cfg.more_served_names)
    if given and len(given) != len(refs):
        raise InputError(f"{len(refs)} models and {len(given)} --served-model-name", "give --served-model-name once per model, in the order of the models, or not at all")
    names = given or [default_name(r) for r in refs]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise InputError(f"two models would be served as {n!r} ({refs[names.index(n)]} and {refs[i]})",
                             "give each its own name: --served-model-name once per model, in the order of the models")
    return list(zip(names, refs))


def serve_models(cfg: ServeConfig, kv_bytes: int) -> dict[str, Any]:
    """Run a server for several models until SIGTERM or Ctrl-C; returns the final metrics summary."""
    import uvicorn

    from mlc.commands.serve.server import DrainingServer
    from mlc.io.hfdir import read_config
    from mlc.runs import open_run

    if cfg.lora or cfg.allow_runtime_lora:
        raise InputError("LoRA adapters with several models: which model an adapter attaches to would be ambiguous",
                         "serve adapters from a server with one base model")
    named = served_models(cfg)
    max_memory = parse_memory(cfg.max_memory, available_memory(), "--max-memory") if cfg.max_memory is not None else None
    record = {k: v for k, v in asdict(cfg).items() if k != "api_key"} | {"api_key": "set" if cfg.api_key else None}
    with open_run("serve", record, handle_sigterm=False) as run:
        paths = [(name, run.add_input(ref, role=f"model:{name}")) for name, ref in named]  # lineage: every served model
        sizes: dict[str, int] = {}
        failed: dict[str, BaseException] = {}
        longest = 0
        for i, (name, path) in enumerate(paths):
            try:
                need = footprint(path, cfg.dtype, kv_bytes)
                longest = max(longest, int(read_config(path).get("max_position_embeddings", 0)))
            except MlcError as e:
                if i == 0:
                    raise
                console.warn(f"model {name!r} cannot be served: {e.message}")  # its requests get this error; the others serve
                failed[name], need = e, (0, 0)
            if max_memory is not None:
                check_fits(name, need, max_memory)
            sizes[name] = sum(need)
        families = MetricFamilies(cfg.max_model_len or longest or 2048)
        jobs: set = set()
        models = []
        for name, path in paths:
            state = ServerState(name, cfg.api_key, cfg.max_queue, jobs=jobs, runs_root=run.root)
            metrics = ServeMetrics(name, families=families)
            m = ServedModel(name, path, state, build_app(state), metrics, sizes[name])
            if name in failed:
                m.status, m.error = "failed", failed[name]
            models.append(m)
        fatal: list[BaseException] = []

        def on_fatal(error: BaseException) -> None:
            fatal.append(error)
            server.should_exit = True

        modelset = ModelSet(cfg, models, kv_bytes, max_memory, families, jobs, on_fatal)
        server = DrainingServer(
            uvicorn.Config(Front(modelset, cfg.api_key), host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5,
                           lifespan="on"),
            modelset,
            cfg.grace_period,
        )
        console.info(f"serving {', '.join(n for n, _ in named)} on http://{cfg.host}:{cfg.port}/v1 (the first loads now, the others on "
                     f"their first request{f'; --max-memory {mib(max_memory)}' if max_memory is not None else ''})")
        server.run()
        modelset.stop()
        summary = modelset.summary()
        run.log_metrics(summary)
        run.set_summary(**summary)
        if fatal:
            raise fatal[0]
        if not server.started:
            raise InputError(f"could not listen on {cfg.host}:{cfg.port}", "is the port in use? choose another with --port")
        return summary
