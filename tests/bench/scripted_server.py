"""A real HTTP/1.1 server that streams OpenAI-style tokens on a script: the reference for bench's timings.

The script rides in the prompt (the completions prompt, or the chat's last message):
    "script ttft=50 itl=20 n=5"        the first token 50 ms after the request arrived, then one every 20 ms, 5 tokens
    "script status=500"                an error response
    "script drop=3 itl=10"             the connection drops after 3 tokens
    "script empty=1"                   a 200 stream with no token
    "script usage=0 n=3"               no usage message (the client must count tokens itself)
    "script ttft=0 itl=0 n=128"        every message at once (the instant server)
Without a script: n = max_tokens, and the server's default delays (none unless --ttft/--itl say so). `usage` (default on) sends the final usage message when asked.
Token i is due at arrival + ttft + i * itl (absolute times, so delays do not accumulate drift), and the
server logs when it wrote each message (time.perf_counter just before the write, the client's clock on this machine).
It runs on its own event loop in a thread (tests) or as a process (`python -m tests.bench.scripted_server PORT`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Script:
    ttft: float = 0.0  # seconds
    itl: float = 0.0
    n: int = 16
    status: int = 200
    drop: int | None = None
    empty: bool = False
    usage: bool = True


def parse_script(prompt: Any, max_tokens: int, default: Script | None = None) -> Script:
    s = Script(n=max_tokens, ttft=default.ttft if default else 0.0, itl=default.itl if default else 0.0)
    if isinstance(prompt, str) and prompt.startswith("script"):
        for item in prompt.split()[1:]:
            key, _, value = item.partition("=")
            if key in ("ttft", "itl"):
                setattr(s, key, float(value) / 1000)
            elif key in ("n", "status", "drop"):
                setattr(s, key, int(value))
            elif key in ("empty", "usage"):
                setattr(s, key, value == "1")
    return s


@dataclass
class Logged:
    prompt: Any
    received: float
    sent: list[float] = field(default_factory=list)
    status: int = 200
    auth: str | None = None  # the Authorization header, as received
    model: str | None = None  # the request's "model"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class ScriptedServer:
    def __init__(self, port: int = 0, usage: bool = True, model: str = "scripted", keep_log: bool = True, log_file: str | None = None,
                 default: Script | None = None):
        self.port, self.usage, self.model, self.keep_log, self.default = port, usage, model, keep_log, default
        self.log_file = open(log_file, "a", buffering=1) if log_file else None  # one JSON line per finished request
        self.log: list[Logged] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._cache: dict[tuple[int, bool, bool], bytes] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "ScriptedServer":
        self.thread = threading.Thread(target=self._serve_forever, daemon=True)
        self.thread.start()
        self._ready.wait(10)
        return self

    def _serve_forever(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._open())
        self._ready.set()
        self.loop.run_forever()

    async def _open(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.server.close)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- HTTP ---------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = time.perf_counter()
                entry = Logged(None, received, auth=headers.get("authorization"))
                more = await self._respond(method, path, body, entry, writer)
                if self.log_file and entry.prompt is not None:
                    self.log_file.write(json.dumps(vars(entry)) + "\n")
                if not more:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _json(self, writer: asyncio.StreamWriter, status: int, data: Any) -> None:
        raw = json.dumps(data).encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(raw), raw))
        await writer.drain()

    async def _respond(self, method: str, path: str, body: bytes, entry: Logged, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        if method == "GET" and path == "/health":
            await self._json(writer, 200, {})
            return True
        if method == "GET" and path == "/v1/models":
            await self._json(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
            return True
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            await self._json(writer, 404, {"error": {"message": "not found"}})
            return True
        req = json.loads(body)
        chat = path.endswith("chat/completions")
        prompt = req["messages"][-1]["content"] if chat else req["prompt"]
        max_tokens = req.get("max_completion_tokens" if chat else "max_tokens") or 16
        script = parse_script(prompt, max_tokens, self.default)
        entry.prompt, entry.status, entry.model, received = prompt, script.status, req.get("model"), entry.received
        if self.keep_log:  # the standalone instant server serves unbounded runs and keeps nothing
            self.log.append(entry)
        if script.status != 200:
            await self._json(writer, script.status, {"error": {"message": f"scripted failure {script.status}", "type": "server_error"}})
            return True
        usage = self.usage and script.usage and bool(req.get("stream_options", {}).get("include_usage"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        if script.ttft == 0 and script.itl == 0 and script.drop is None and not script.empty:
            entry.sent = [time.perf_counter()] * script.n
            writer.write(self._whole(script.n, chat, usage))  # the instant server: one write
            await writer.drain()
            return True
        n = 0 if script.empty else script.n
        for i in range(n):
            if script.drop is not None and i == script.drop:
                return False  # closes mid-stream, without the chunked terminator
            delay = received + script.ttft + i * script.itl - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            message = _chunk(self._message(i, n, chat))
            entry.sent.append(time.perf_counter())  # taken before the write: no client can see the token earlier
            writer.write(message)
            await writer.drain()
        if usage:
            writer.write(_chunk(self._usage(n, chat)))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    def _message(self, i: int, n: int, chat: bool) -> bytes:
        finish = "length" if i == n - 1 else None
        if chat:
            choice = {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": f"t{i} ", "finish_reason": finish}
        return b"data: " + json.dumps({"object": "chunk", "model": self.model, "choices": [choice]}).encode() + b"\n\n"

    def _usage(self, n: int, chat: bool) -> bytes:
        return b"data: " + json.dumps({"object": "chunk", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}).encode() + b"\n\n"

    def _whole(self, n: int, chat: bool, usage: bool) -> bytes:
        key = (n, chat, usage)
        if key not in self._cache:
            parts = [_chunk(self._message(i, n, chat)) for i in range(n)]
            if usage:
                parts.append(_chunk(self._usage(n, chat)))
            self._cache[key] = b"".join(parts) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        return self._cache[key]


if __name__ == "__main__":  # python -m tests.bench.scripted_server PORT [--log FILE] [--ttft MS] [--itl MS]: a server process
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--log", help="one JSON line per request (without it, nothing is kept: for unbounded runs)")
    ap.add_argument("--ttft", type=float, default=0.0, help="ms before the first token of an unscripted prompt")
    ap.add_argument("--itl", type=float, default=0.0, help="ms between its tokens")
    a = ap.parse_args()
    ScriptedServer(a.port, keep_log=bool(a.log), log_file=a.log, default=Script(ttft=a.ttft / 1000, itl=a.itl / 1000)).start()
    print("ready", flush=True)
    threading.Event().wait()
