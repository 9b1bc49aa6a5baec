"""One API request: its engine requests, the events they send back, and the response or SSE stream built from them.

The job is created, checked against the context, the grammar and --max-queue, and submitted before
its route first awaits, so concurrent requests count each other in the queue. The engine thread
pushes SeqEvents into the job's asyncio queue; the route turns them into one JSON response or a
stream. A client that goes away aborts the job's engine requests (their KV blocks are freed at the
next step); a request the engine fails ends as a 500 with an error body or, streamed, as a final
chunk holding the error followed by [DONE].
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mlc.commands.serve import protocol as P
from mlc.commands.serve.engine import Engine, GenerationRequest, SeqEvent
from mlc.commands.serve.tools import ToolCallParser, ToolSpec
from mlc.errors import ValidationError

if TYPE_CHECKING:
    from mlc.commands.serve.api import ServerState


def check_ids(state: ServerState, name: str, ids: list[int]) -> None:
    vocab = state.engine.vocab_size if state.engine is not None else 1 << 31
    if any(t >= vocab for t in ids):
        raise P.bad(name, f"token ids must be below the vocabulary size {vocab}")


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    error: str | None = None
    started: bool = False
    tools: ToolCallParser | None = None  # reads tool calls out of the text (chat with tools)


class Job:
    """One API request: its engine requests, their events, and the response or stream built from them.

    Created (and its engine requests submitted) before the route first awaits, so concurrent requests
    count each other against --max-queue.
    """

    def __init__(self, state: ServerState, engine: Engine, kind: str, req: Any, prompts: list[list[int]], max_tokens: int,
                 logprobs: int | None, response_format: dict[str, Any] | None = None, tools: ToolSpec | None = None, adapter: Any = None):
        self.state, self.engine, self.kind, self.req = state, engine, kind, req
        self.prompts, self.logprobs, self.tools = prompts, logprobs, tools
        self.n = req.n
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tokenizer = state.tokenizer
        vocab = engine.vocab_size
        check_ids(state, "stop_token_ids", req.stop_token_ids)
        if any(t >= vocab for t in req.bias):
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
        if response_format is None and req.response_format is not None:
            response_format = req.response_format.model_dump(by_alias=True)
        if response_format is not None:
            try:
                grammar = state.grammars.grammar(response_format)
            except ValidationError as e:
                raise P.bad("response_format", "; ".join(e.problems)) from None
        sequences = len(prompts) * self.n
        if sequences > state.max_queue:
            raise P.bad("n", f"asks for {sequences} sequences; this server queues at most {state.max_queue} (--max-queue)")
        if engine.num_waiting + sequences > state.max_queue:
            raise P.ApiError(429, f"the queue is full ({state.max_queue} waiting sequences); retry later", code="queue_full",
                             headers={"Retry-After": "1"})
        params = req.sampling_params(logprobs)
        self.requests = [
            GenerationRequest(f"{self.id}-{i}", p, params, max_tokens=max_tokens, n=self.n, stop=req.stops,
                              stop_token_ids=list(req.stop_token_ids), ignore_eos=req.ignore_eos, grammar=grammar,
                              adapter=adapter)
            for i, p in enumerate(prompts)
        ]
        self.slot = {r.request_id: i for i, r in enumerate(self.requests)}
        self.choices = [_Choice(tools=tools.parser() if tools is not None else None) for _ in range(len(prompts) * self.n)]
        self.cached = 0  # prompt tokens found in the prefix cache
        self.queue: asyncio.Queue[SeqEvent] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.closed = False
        state.jobs.add(self)
        for r in self.requests:
            engine.submit(r, self._sink)

    def _sink(self, event: SeqEvent) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def abort(self, notify: bool = False) -> None:
        for r in self.requests:
            self.engine.abort(r.request_id, notify=notify)

    def close(self) -> None:
        """The response is over (sent or abandoned): stop what is left and leave the set of jobs in flight."""
        if not self.closed:
            self.closed = True
            if self._unfinished():
                self.abort()
            self.state.jobs.discard(self)

    def _unfinished(self) -> bool:
        return any(c.finish_reason is None for c in self.choices)

    def _apply(self, ev: SeqEvent) -> int:
        i = self.slot[ev.request_id] * self.n + ev.index
        c = self.choices[i]
        c.text += ev.text
        c.token_ids += ev.token_ids
        c.logprobs += ev.logprobs
        if ev.finish_reason is not None:
            c.finish_reason, c.stop_reason, c.error = ev.finish_reason, ev.stop_reason, ev.error
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
        if self.req.stream:
            return _EventStream(self._stream(), self)
        disconnected = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while self._unfinished():
                getter = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return Response(status_code=499)
                self._apply(getter.result())
        finally:
            disconnected.cancel()
            self.close()
        if failed := next((c for c in self.choices if c.finish_reason == "error"), None):
            raise P.ApiError(500, f"generation failed: {failed.error}", code="internal_error")
        if any(c.finish_reason == "abort" for c in self.choices):
            raise P.ApiError(503, "the server shut down before the request finished; retry", code="draining", headers={"Retry-After": "1"})
        return JSONResponse(self._final_body())

    def _final_body(self) -> dict[str, Any]:
        chat = self.kind == "chat.completion"
        choices = []
        for i, c in enumerate(self.choices):
            reason = c.finish_reason
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": c.text}
                if c.tools is not None:
                    c.tools.feed(c.text, final=True)
                    message, reason = c.tools.message(), _tools_reason(c.tools, reason)
                choice = {"index": i, "message": message, "finish_reason": reason, "stop_reason": c.stop_reason}
                choice["logprobs"] = {"content": self._chat_logprobs(c.logprobs)} if self.logprobs is not None else None
            else:
                text = c.text
                if self.req.echo:
                    text = self.tokenizer.decode(self.prompts[i // self.n]) + text
                choice = {"index": i, "text": text, "finish_reason": reason, "stop_reason": c.stop_reason}
                choice["logprobs"] = self._completion_logprobs(c.logprobs, 0) if self.logprobs is not None else None
            choices.append(choice)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.req.model, "choices": choices, "usage": self.usage()}

    async def _stream(self) -> AsyncIterator[str]:
        chat = self.kind == "chat.completion"
        include_usage = self.req.stream_options is not None and self.req.stream_options.include_usage
        obj = "chat.completion.chunk" if chat else "text_completion"
        offsets = [0] * len(self.choices)

        def chunk(choice: dict[str, Any]) -> str:
            body = {"id": self.id, "object": obj, "created": self.created, "model": self.req.model, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        while self._unfinished():
            ev = await self.queue.get()
            i = self._apply(ev)
            c = self.choices[i]
            if ev.finish_reason == "error":  # the request failed: its error, then the end of the stream
                yield f"data: {json.dumps(P.error_body(500, f'generation failed: {ev.error}', code='internal_error'))}\n\n"
                yield "data: [DONE]\n\n"
                return
            if chat:
                if not c.started:
                    c.started = True
                    yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
                if c.tools is not None:  # text and calls as the parser reads them out of the text so far
                    delta = c.tools.feed(ev.text, final=ev.finish_reason is not None)
                    lp = {"content": self._chat_logprobs(ev.logprobs)} if self.logprobs is not None and ev.logprobs else None
                    if delta or lp:
                        yield chunk({"index": i, "delta": delta, "logprobs": lp, "finish_reason": None})
                    if ev.finish_reason is not None:
                        yield chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": _tools_reason(c.tools, ev.finish_reason),
                                     "stop_reason": ev.stop_reason})
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
                    if self.req.echo:
                        text = self.tokenizer.decode(self.prompts[i // self.n]) + text
                lp = self._completion_logprobs(ev.logprobs, offsets[i]) if self.logprobs is not None else None
                offsets[i] += len(text)
                if text or ev.finish_reason is not None or lp:
                    yield chunk({"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason, "stop_reason": ev.stop_reason})
        if include_usage:
            body = {"id": self.id, "object": obj, "created": self.created, "model": self.req.model, "choices": [], "usage": self.usage()}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _chat_logprobs(self, results: list[Any]) -> list[dict[str, Any]]:
        out = []
        for r in results:
            text = self._token_text(r.token)
            top = [{"token": self._token_text(t), "logprob": _finite(lp), "bytes": list(self._token_text(t).encode())} for t, lp in (r.top or [])]
            out.append({"token": text, "logprob": _finite(r.logprob), "bytes": list(text.encode()), "top_logprobs": top})
        return out

    def _completion_logprobs(self, results: list[Any], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for r in results:
            tokens.append(self._token_text(r.token))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(r.logprob) for r in results],
            "top_logprobs": [{self._token_text(t): _finite(lp) for t, lp in (r.top or [])} for r in results],
            "text_offset": offsets,
        }


def _tools_reason(parser: ToolCallParser, reason: str | None) -> str | None:
    """finish_reason tool_calls for an output that ended normally with calls in it."""
    return "tool_calls" if parser.calls and reason == "stop" else reason


def _finite(logprob: float | None) -> float | None:
    """A logprob JSON can carry: -inf (a token the grammar or logit_bias ruled out) becomes the lowest float, as in vLLM."""
    if logprob is None or math.isfinite(logprob):
        return logprob
    return -9999.0 if logprob < 0 else 9999.0


class _EventStream(StreamingResponse):
    """An SSE response that closes its job however the response ends (even if the stream never started)."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the request body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
