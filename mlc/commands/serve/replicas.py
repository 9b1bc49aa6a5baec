"""`mlc serve MODEL --replicas N`: N engine replicas as a Ray Serve deployment behind one OpenAI-compatible endpoint.

This process joins a Ray cluster (--ray-address) or starts a local Ray instance, deploys
replica.EngineReplica with Ray Serve (its controller starts, health-checks and replaces replicas, and
autoscales them between --min-replicas and --max-replicas on requests in flight per replica), and
serves the HTTP endpoint itself: each request is read (16 MiB limit), given a routing key (its prompt
text; routing.PrefixAffinityRouter picks the replica) and forwarded through the deployment handle,
and the replica's response is streamed back as it comes. The API is the single server's (each
replica answers with api.build_app), except:

- /metrics: every replica's metrics, each sample with a `replica` label (the replica id);
- /health: 200 while one replica answers its /health with 200 (503 while draining, as a single server);
- a request whose replica dies fails at once: a 503 with an error body, or, streamed, a final
  `data: {"error": ...}` chunk and `data: [DONE]`; Ray routes new requests to the other replicas and
  starts a replacement.

Ray Serve's own HTTP proxy is not started (the front is this process), so a request makes one hop.
On SIGTERM the front drains as a single server does (new requests 503, in-flight ones run up to
--grace-period, the rest fail with a 503 or an error chunk), then deletes the deployment. The run
record (one for the deployment) lists every replica that served, with its pid and host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mlc import console
from mlc.commands.serve.server import ServeConfig, served_name
from mlc.errors import MlcError, MlcUsageError

APP_NAME = "mlc-serve"
PER_REPLICA_TIMEOUT_S = 10.0  # a replica that has not answered its /metrics or description by then is left out
REFRESH_S = 2.0  # how often the replica list in the run record is refreshed
SHUTDOWN_S = 60.0  # the longest the deployment's removal may take at exit


@dataclass
class ReplicaPlan:
    """How many replicas and where: fixed (min == max) or autoscaled on requests in flight per replica."""

    min_replicas: int
    max_replicas: int
    ray_address: str = "local"
    target_ongoing_requests: float = 16.0
    cpus_per_replica: float = 1.0

    def deployment_options(self, cfg: ServeConfig) -> dict[str, Any]:
        from ray.serve.config import RequestRouterConfig

        from mlc.commands.serve.router import PrefixAffinityRouter

        scale: dict[str, Any] = {"num_replicas": self.min_replicas}
        if self.max_replicas > self.min_replicas:
            scale = {"autoscaling_config": {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas, "initial_replicas": self.min_replicas,
                "target_ongoing_requests": self.target_ongoing_requests, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0,
            }}
        return {
            "name": "engine", **scale,
            # A replica admits what its own engine admits (running + --max-queue; past that it answers 429 itself).
            "max_ongoing_requests": cfg.max_running + cfg.max_queue,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica},
            "request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter),
            "health_check_period_s": 2.0, "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": cfg.grace_period,
        }


def check_plan(replicas: int | None, min_replicas: int | None, max_replicas: int | None) -> tuple[int, int] | None:
    """(min, max) replicas from the CLI, None for a single server; MlcUsageError for contradictions."""
    if replicas is None and min_replicas is None and max_replicas is None:
        return None
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise MlcUsageError("--replicas is a fixed count; --min-replicas/--max-replicas autoscale", "give one or the other")
    if replicas is not None:
        return replicas, replicas
    low, high = min_replicas or 1, max_replicas if max_replicas is not None else max(min_replicas or 1, 1)
    if low > high:
        raise MlcUsageError(f"--min-replicas {low} is above --max-replicas {high}", "lower --min-replicas or raise --max-replicas")
    return low, high


def serve_replicas(cfg: ServeConfig, plan: ReplicaPlan) -> dict[str, Any]:
    """Deploy the replicas, serve the front until SIGTERM or Ctrl-C, remove the deployment; returns the run summary."""
    import uvicorn

    from mlc.commands.serve.server import DrainingServer
    from mlc.distributed.ray import LOCAL, ray_session
    from mlc.runs import open_run

    record = {k: v for k, v in asdict(cfg).items() if k != "api_key"} | {"api_key": "set" if cfg.api_key else None} | {
        "replicas": asdict(plan)}
    with open_run("serve", record, handle_sigterm=False) as run:
        path = run.add_input(cfg.model, role="model")
        name = served_name(cfg)
        num_cpus = None
        if plan.ray_address == LOCAL:  # room for every replica even on a small machine (each replica's threads: --threads)
            num_cpus = max(os.cpu_count() or 1, int(plan.max_replicas * plan.cpus_per_replica + 0.999))
        with ray_session(plan.ray_address, num_cpus=num_cpus):
            import logging

            from ray import serve

            logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would interleave with mlc's

            from mlc.commands.serve.replica import EngineReplica

            serve.start(proxy_location="Disabled")
            console.info(f"starting {plan.min_replicas} replica(s) of {name} on Ray Serve (model load in each)")
            try:
                deployment = serve.deployment(EngineReplica, **plan.deployment_options(cfg))
                handle = serve.run(deployment.bind(cfg, name, str(path)), name=APP_NAME, route_prefix=None)
            except Exception as e:  # noqa: BLE001 - Ray's deployment failure carries the replica's traceback: one line of it
                raise MlcError(f"the replicas failed to start: {_first_line(e)}", "see the replica logs under /tmp/ray/session_latest/logs") from None
            front = Front(handle, name, run)
            server = DrainingServer(uvicorn.Config(front, host=cfg.host, port=cfg.port, log_level="warning", lifespan="off",
                                                   timeout_graceful_shutdown=5), front, cfg.grace_period)
            console.info(f"serving {name} on http://{cfg.host}:{cfg.port}/v1 with {plan.min_replicas}..{plan.max_replicas} replicas")
            try:
                server.run()
            finally:
                _remove_deployment(serve)
            if not server.started:
                raise MlcError(f"could not listen on {cfg.host}:{cfg.port}", "is the port in use? choose another with --port")
        summary = {"replicas": list(front.replicas.values()), "requests": front.requests, "replica_failures": front.failures}
        run.set_summary(**summary)
        return summary


def _remove_deployment(serve: Any) -> None:
    """Delete the deployment and stop Serve, giving up after SHUTDOWN_S: a Ray whose raylet is already gone (a
    terminal's Ctrl-C reaches the local Ray processes too) would otherwise keep this process waiting forever."""
    import threading

    def remove() -> None:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
            serve.shutdown()

    worker = threading.Thread(target=remove, name="mlc-serve-shutdown", daemon=True)
    worker.start()
    worker.join(SHUTDOWN_S)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln and not ln.startswith(("File ", "Traceback"))]
    return (errors[-1] if errors else lines[0] if lines else type(e).__name__)[:300]


@dataclass
class Front:
    """The ASGI app in front of the replicas (and the drain state DrainingServer expects)."""

    handle: Any
    model_name: str
    run: Any
    draining: bool = False
    jobs: set = field(default_factory=set)  # relays in flight (asyncio tasks; abort_all cancels them)
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)  # replica id -> {pid, host, first_seen, last_seen}
    requests: int = 0
    failures: int = 0
    _refresher: Any = None

    def abort_all(self) -> None:
        for task in list(self.jobs):
            task.cancel()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        path = scope["path"]
        if path == "/metrics":
            return await self._metrics(send)
        if self.draining:
            return await _json(send, 503, _error(503, "the server is shutting down; retry on another replica or after its restart", "draining"),
                               [(b"retry-after", b"1")])
        body = await _read_body(receive)
        if body is None:
            from mlc.commands.serve.api import MAX_BODY_BYTES

            return await _json(send, 413, _error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes"))
        from mlc.commands.serve.routing import Envelope, route_key

        env = Envelope(scope["method"], path, scope.get("query_string", b""), list(scope.get("headers", [])), body, route_key(path, body))
        self.requests += 1
        loop = asyncio.get_running_loop()
        relay = loop.create_task(self._relay(env, send))
        self.jobs.add(relay)
        watcher = loop.create_task(_disconnected(receive))
        try:
            await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not relay.done():  # the client went away: stop the request (the replica aborts it)
                relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)
        finally:
            watcher.cancel()
            self.jobs.discard(relay)

    async def _relay(self, env: Any, send: Any) -> None:
        """Stream the replica's ASGI messages to the client; a replica failure ends the response cleanly."""
        started: dict[str, Any] | None = None
        gen = self.handle.options(stream=True).remote(env)
        try:
            async for message in gen:
                if message["type"] == "http.response.start":
                    started = message
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    return
            raise RuntimeError("the replica's response ended early")
        except asyncio.CancelledError:  # the client went away, or the drain's grace period ran out
            gen.cancel()
            if self.draining:
                await _fail(send, started, 503, "the request was aborted: the server is shutting down", "draining")
        except Exception as e:  # noqa: BLE001 - the replica died or failed: this request ends with an error, the service goes on
            self.failures += 1
            await _fail(send, started, 503, f"the replica serving this request failed ({type(e).__name__}); retry", "replica_failed")

    async def _each_replica(self, method: str, path: str = "") -> dict[str, Any]:
        """{replica id: answer} of one call to every live replica (those that do not answer in time are left out)."""
        from mlc.commands.serve.routing import Envelope, live_replica_ids

        ids = live_replica_ids()

        async def one(rid: str) -> Any:
            env = Envelope("GET", path, target=rid)
            if method == "describe":
                return await self.handle.describe.remote(env)
            return [m async for m in self.handle.options(stream=True).remote(env)]

        results = await asyncio.gather(*(asyncio.wait_for(one(r), PER_REPLICA_TIMEOUT_S) for r in ids), return_exceptions=True)
        return {rid: res for rid, res in zip(ids, results) if not isinstance(res, BaseException)}

    async def _metrics(self, send: Any) -> None:
        from mlc.commands.serve.metrics import CONTENT_TYPE

        await self._ensure_router()
        texts = {}
        for rid, messages in (await self._each_replica("http", "/metrics")).items():
            texts[rid] = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body").decode()
        body = merge_metrics(texts)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", CONTENT_TYPE.encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _ensure_router(self) -> None:
        """The handle's router (which knows the replicas) exists once a request has gone through it."""
        from mlc.commands.serve.routing import Envelope, live_replica_ids

        if not live_replica_ids():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.handle.describe.remote(Envelope("GET", "")), PER_REPLICA_TIMEOUT_S)

    async def _refresh_loop(self) -> None:
        """Keep the run record's replica list: each replica's pid and host, when it was first and last seen."""
        while True:
            with contextlib.suppress(Exception):
                await self._ensure_router()
                now = time.time()
                for rid, info in (await self._each_replica("describe")).items():
                    entry = self.replicas.setdefault(rid, {**info, "first_seen": now})
                    entry["last_seen"] = now
                self.run.set_summary(replicas=list(self.replicas.values()))
            await asyncio.sleep(REFRESH_S)


def merge_metrics(texts: dict[str, str]) -> bytes:
    """One Prometheus exposition of several replicas' metrics, each sample labelled with its replica id."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    for rid, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, _empty_like(fam))
            for s in fam.samples:
                merged.samples.append(type(s)(s.name, {**s.labels, "replica": rid}, s.value, s.timestamp, s.exemplar))

    class Merged:
        def collect(self) -> list[Any]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def _empty_like(fam: Any) -> Any:
    from prometheus_client.metrics_core import Metric

    return Metric(fam.name, fam.documentation, fam.type, fam.unit)


def _error(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    from mlc.commands.serve.protocol import error_body

    return error_body(status, message, code=code)


async def _json(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def _fail(send: Any, started: dict[str, Any] | None, status: int, message: str, code: str) -> None:
    """End a response that cannot complete: an error body, or, once a stream has started, an error chunk and [DONE]."""
    with contextlib.suppress(Exception):  # the client may be gone too
        if started is None:
            await _json(send, status, _error(status, message, code), [(b"retry-after", b"1")])
            return
        content_type = dict(started.get("headers", [])).get(b"content-type", b"")
        tail = b""
        if content_type.startswith(b"text/event-stream"):
            tail = f"data: {json.dumps(_error(status, message, code))}\n\ndata: [DONE]\n\n".encode()
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _read_body(receive: Any) -> bytes | None:
    """The request body, or None once it passes the 16 MiB limit (the rest is read and dropped)."""
    from mlc.commands.serve.api import MAX_BODY_BYTES

    chunks, size, over = [], 0, False
    while True:
        event = await receive()
        if event["type"] != "http.request":
            return b"".join(chunks)
        size += len(event.get("body", b""))
        if size > MAX_BODY_BYTES:
            over, chunks = True, []
        elif not over:
            chunks.append(event.get("body", b""))
        if not event.get("more_body"):
            return None if over else b"".join(chunks)


async def _disconnected(receive: Any) -> None:
    """Returns when the client disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass
