"""One engine replica of `mlc serve --replicas N`: a Ray Serve deployment running mlc's engine and its own API app.

Each replica loads the model and runs the engine loop in one thread (as `mlc serve` does), and answers
each request the front forwards by running it through the same FastAPI app a single server uses
(api.build_app): request models, validation errors, streaming, structured output and /metrics are the
single server's by construction. The ASGI messages the app sends are streamed back to the front one by
one. When the front cancels a request (its client went away), the app sees an http.disconnect, so
the engine aborts that request as it would for a direct client.

Ray Serve calls check_health periodically: an engine loop that has stopped or stalled fails it, and
Ray replaces the replica.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mlc.commands.serve.routing import Envelope
from mlc.commands.serve.server import ServeConfig, available_memory, load_engine, parse_memory


class EngineReplica:
    """The deployment's class: Ray Serve constructs it in each replica process."""

    def __init__(self, cfg: ServeConfig, name: str, path: str):
        from mlc.commands.serve.api import ServerState, build_app

        self.state = ServerState(name, cfg.api_key, cfg.max_queue)
        self.app = build_app(self.state)
        self.started = time.time()
        loaded = threading.Event()
        budget = parse_memory(cfg.kv_cache_memory, available_memory())

        def load_and_run() -> None:  # the thread that loads the weights runs the engine loop (see Engine.run)
            try:
                engine, tokenizer, grammars = load_engine(cfg, name, Path(path), budget)
            except BaseException as e:  # noqa: BLE001 - re-raised in the constructor: Ray reports the replica failed to start
                self.state.load_error = e
                loaded.set()
                return
            engine.compile_in_background()  # with --compile (see compiling.py)
            engine.metrics.bind_engine(engine)
            self.state.tokenizer, self.state.grammars, self.state.max_model_len = tokenizer, grammars, engine.config.max_model_len
            self.state.metrics = engine.metrics
            self.state.engine = engine
            loaded.set()
            engine.run()

        threading.Thread(target=load_and_run, name="mlc-serve-engine", daemon=True).start()
        loaded.wait()
        if self.state.load_error is not None:
            raise self.state.load_error

    def check_health(self) -> None:
        engine = self.state.engine
        if engine is None or not engine.healthy():
            raise RuntimeError(f"the engine is not running: {engine.error if engine else 'not loaded'}")

    async def describe(self, target: Any = None) -> dict[str, Any]:
        """This replica's id, pid and host (for the deployment's run record)."""
        from ray import serve

        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(), "host": socket.gethostname(),
                "started": self.started}

    async def __call__(self, env: Envelope) -> AsyncIterator[dict[str, Any]]:
        """The ASGI messages of the app's response to one forwarded request."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": env.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.put_nowait(message)

        async def run() -> None:
            try:
                await self.app(scope(env), receive, send)
            finally:
                messages.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                yield message
            await task  # an exception the app let out is the caller's error
        finally:
            gone.set()  # the front cancelled: the app sees the client disconnect and aborts the request
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout=5)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    task.cancel()


def scope(env: Envelope) -> dict[str, Any]:
    """An ASGI HTTP scope for a forwarded request."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "scheme": "http",
        "method": env.method, "path": env.path, "raw_path": env.path.encode(), "query_string": env.query, "root_path": "",
        "headers": env.headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
    }
