"""One streamed request to an OpenAI-compatible endpoint, timed the way `vllm bench serve` times it.

Why aiohttp and not httpx: the client must stay cheap next to the server it measures on the same few
cores. Against an instant server (benchmarks/bench_client_overhead.py), one core parses several times
more SSE chunks per second through aiohttp (C parser, one read per network chunk) than through httpx's
async streaming, and vLLM's own benchmark uses aiohttp for the same reason.

Timing (vLLM's definitions, from vllm/benchmarks/lib/endpoint_request_func.py):
- start: just before the request is sent; TTFT: the first SSE message that carries a non-empty
  `choices` list (its text may be empty); ITL: the gaps between such messages; latency (E2EL): the
  last such message minus start (the usage-only message and `[DONE]` do not count).
- success: HTTP 200 and at least one choices message; anything else (a status, a dropped
  connection, a stream with no token, an error object in the stream) is a failed request.
- token counts: `usage` from the final message (requested with stream_options.include_usage).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Outcome:
    """What one request measured; times in seconds (perf_counter clock)."""

    index: int
    success: bool = False
    start: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    text: str = ""
    prompt_tokens: int | None = None  # from the server's usage, when it sent one
    output_tokens: int | None = None
    error: str = ""
    queued: float = 0.0  # seconds the request waited for a --max-concurrency slot before being sent


@dataclass
class Target:
    """Where and how requests go: the endpoint URL, the model name, headers and fixed body fields."""

    url: str  # the full endpoint URL, e.g. http://127.0.0.1:8000/v1/completions
    model: str
    chat: bool
    headers: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)  # sampling fields, ignore_eos


def request_body(target: Target, prompt: str | list[int] | list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """The JSON body for one request (streaming, with usage in the last message)."""
    body: dict[str, Any] = {"model": target.model, "stream": True, "stream_options": {"include_usage": True}}
    if target.chat:
        messages = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) else [{"role": "user", "content": prompt}]
        body.update(messages=messages, max_completion_tokens=max_tokens)
    else:
        body.update(prompt=prompt, max_tokens=max_tokens)
    body.update(target.extra_body)
    return body


def _error_text(status: int, reason: str | None, raw: bytes) -> str:
    """One line from an error response: the OpenAI-shaped error message when there is one."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", text) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    first = (str(text).splitlines() or [""])[0][:300]
    return f"HTTP {status} {reason or ''}: {first}".replace("  ", " ").strip()


class SSEParser:
    """Splits a server-sent-event byte stream into the data of its messages (LF or CRLF line ends)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.ended = False  # the byte stream ended

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buffer += chunk
        if b"\r" in chunk:  # sse-starlette (llama-cpp-python's server) ends lines with CRLF
            self.buffer = self.buffer.replace(b"\r\n", b"\n")
        if b"\n\n" not in self.buffer:
            return []
        *messages, self.buffer = self.buffer.split(b"\n\n")
        return self._data(messages)

    def flush(self) -> list[bytes]:
        """The last message, if the stream ended without a blank line after it."""
        rest, self.buffer, self.ended = self.buffer, b"", True
        return self._data([rest])

    def _data(self, messages: list[bytes]) -> list[bytes]:
        found = []
        for message in messages:
            for line in message.split(b"\n"):  # a message may have several fields; only data lines matter
                if not line.startswith(b"data:"):
                    continue  # comments (":" keep-alives), event:, id:, retry:
                data = line[5:].strip()
                if data and data != b"[DONE]":
                    found.append(data)
        return found


async def send(session: aiohttp.ClientSession, target: Target, index: int, body: dict[str, Any]) -> Outcome:
    """Send one streaming request and time its tokens; never raises for a failed request."""
    out = Outcome(index)
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **target.headers}
    parser = SSEParser()
    text: list[str] = []
    got_token = False
    out.start = last = time.perf_counter()
    try:
        async with session.post(target.url, data=payload, headers=headers) as resp:
            if resp.status != 200:
                out.error = _error_text(resp.status, resp.reason, await resp.read())
                return out
            reads = resp.content.iter_any()
            while not parser.ended:  # read to the end (past [DONE]) so the connection is reused
                try:
                    chunk = await reads.__anext__()
                except StopAsyncIteration:
                    messages, now = parser.flush(), time.perf_counter()
                else:
                    now = time.perf_counter()  # the arrival of this network read: every message in it arrived now
                    messages = parser.feed(chunk)
                for data in messages:
                    event = json.loads(data)
                    if not isinstance(event, dict):
                        raise ValueError(f"a stream message is not a JSON object: {data[:80]!r}")
                    if event.get("error"):
                        err = event["error"]
                        out.error = "error in stream: " + str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                        return out
                    choices = event.get("choices")
                    if choices:
                        if got_token:
                            out.itl.append(now - last)
                        else:
                            got_token = True
                            out.ttft = now - out.start
                        last = now
                        choice = choices[0]
                        piece = (choice.get("delta") or {}).get("content") if target.chat else choice.get("text")
                        if piece:
                            text.append(piece)
                    usage = event.get("usage")
                    if usage:
                        out.output_tokens = usage.get("completion_tokens")
                        out.prompt_tokens = usage.get("prompt_tokens")
            out.text = "".join(text)
            if not got_token:
                out.error = "the stream ended without a token"
                return out
            out.latency = last - out.start
            out.success = True
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        out.error = f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    return out
