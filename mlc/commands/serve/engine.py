"""The serving engine: one thread that runs the model step by step over whatever requests are live.

Callers (the HTTP layer, tests) `submit` a GenerationRequest with a callback and may `abort` it;
both only enqueue, so the engine thread alone touches the scheduler, the block pool and the model.
Each step: schedule (decodes first, chunked prefills into the token budget), run the model once on
the flat batch through a PagedBatch, compute logits only for sequences that reached their last known
token, sample, detokenise, check stop conditions, and call each request's callback with a SeqEvent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mlc.commands.serve.blocks import KVBlockPool
from mlc.commands.serve.metrics import ServeMetrics
from mlc.commands.serve.scheduler import Scheduler, Sequence
from mlc.commands.serve.textstream import TextStream
from mlc.kernels.paged_attention import PagedBatch, PagedKVStore, Segment
from mlc.kernels.sampling import SampleResult, SamplingParams, SequenceSampler, sample

log = logging.getLogger("mlc.serve")


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_batched_tokens: int = 512
    max_running: int = 128
    max_model_len: int = 2048
    enable_prefix_caching: bool = True
    # torch.compile the steps that are all decodes (the steady state; prefill steps stay eager, so the
    # many shapes of prompt chunks never wait on the compiler). See warm_up.
    compile: bool = False


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    grammar: str | None = None  # an llguidance grammar (structured output)
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class SeqEvent:
    """New output of one sequence (index i of its request) since its previous event."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[SampleResult]
    finish_reason: str | None = None  # "stop", "length", "abort" once finished
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(eq=False)
class SeqState:
    request: GenerationRequest
    index: int
    sink: Callable[[SeqEvent], None]
    sampler: SequenceSampler
    text: TextStream
    matcher: Any = None
    output: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    new_logprobs: list[SampleResult] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    first_scheduled_at: float | None = None
    cached_tokens: int = 0


class Engine:
    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig, metrics: ServeMetrics | None = None, grammars: Any = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        mc = model.config
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            dtype = torch.bfloat16  # quantised weights: keep activations and the cache in bf16
        self.dtype = dtype
        self.vocab_size = mc.vocab_size
        self.store = PagedKVStore(mc.num_hidden_layers, config.num_blocks, config.block_size, mc.num_key_value_heads, mc.head_dim, dtype)
        self.pool = KVBlockPool(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, config.max_batched_tokens, config.max_running)
        self.metrics = metrics or ServeMetrics("model")
        self.grammars = grammars
        self.eos_ids = set(tokenizer.eos_token_ids)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = 0
        self.num_queued = 0  # submitted, not yet admitted to the scheduler (for --max-queue)
        self.steps = 0
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._decode_forward = None
        if config.compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            self._decode_forward = torch.compile(model.forward)

    # ----- called from any thread -----
    def start(self) -> None:
        """Run the engine loop in a new thread (see `run` for why the thread that loaded the model is better)."""
        self._thread = threading.Thread(target=self.run, name="mlc-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Make the loop return (after its current step) and wait for a thread `start` made."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: GenerationRequest, sink: Callable[[SeqEvent], None]) -> None:
        """Queue a request; sink(event) is called from the engine thread as its sequences progress."""
        with self._lock:
            self.num_queued += 1
        self._inbox.put(("add", (request, sink)))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (no further events)."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes at the next step (benchmarks and tests that need a cold cache)."""
        self._inbox.put(("reset_prefix_cache", None))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + self.num_queued

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ----- the engine thread -----
    def run(self) -> None:
        """The engine loop, in the calling thread, until `stop`.

        Call it from the thread that loaded the model, so that one thread alone runs torch's OpenMP
        regions: GNU OpenMP cuts its workers' spin-wait to almost nothing once more of its threads exist
        than cores, and a second thread with its own worker pool is enough on a 2-core machine. Measured
        here: one 1536x576 fp32 matrix-vector product takes 32 us when a single thread runs them and
        128 us when the thread that loaded the weights also has a pool.
        """
        torch.set_grad_enabled(False)
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    self._drain_inbox()
                    if not self.scheduler.has_work():
                        self._wake.wait(0.5)
                        self._wake.clear()
                        continue
                    self.step()
        except BaseException as e:  # a bug or out of memory: fail every live request instead of hanging them
            log.exception("engine step failed")
            self.error = e
            for rid in list(self._requests):
                self._finish_request(rid, notify=True)

    def warm_up(self) -> None:
        """Compile the decode step before the first request (with `compile`; a no-op without).

        Runs throwaway requests that produce each kind of decode step a server meets: one sequence
        (no mask), a growing context (dynamic length), batches of unequal lengths (mask, dynamic batch
        size) and batches of equal lengths (no mask, dynamic batch size), each below and at 16
        sequences (where the quantised kernels switch from their decode to their GEMM path). After
        these, serving 1 to 32 concurrent requests compiled nothing more on SmolLM2. Minutes on a small
        CPU; torch caches the compiled code on disk, so a later start with the same model is faster.
        Metrics and the prefix cache are left as they were.
        """
        if self._decode_forward is None:
            return
        metrics, self.metrics = self.metrics, ServeMetrics("warm-up")
        try:
            rounds = [(5,), (5, 8), (5, 8, 11), (6, 6), (6, 6, 6), tuple(range(5, 21)), (6,) * 16]
            for r, lengths in enumerate(rounds):
                for i, length in enumerate(lengths):
                    prompt = [(7 * j + i) % self.vocab_size for j in range(length)]
                    request = GenerationRequest(f"warm-up-{r}-{i}", prompt, SamplingParams(temperature=0), max_tokens=4, ignore_eos=True)
                    self.submit(request, lambda event: None)
                self.run_until_idle()
        except Exception as e:  # no working compiler toolchain, an unsupported op: serve eagerly instead
            log.warning("torch.compile of the decode step failed, serving without it: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._decode_forward = None
            for rid in list(self._requests):
                self._finish_request(rid, notify=False)
        finally:
            self.metrics = metrics
        self.reset_prefix_cache()

    def run_until_idle(self) -> None:
        """Step in the calling thread until every submitted request has finished (offline use, benchmarks)."""
        with torch.inference_mode():
            self._drain_inbox()
            while self.scheduler.has_work() or self.num_queued:
                self.step()
                self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self.num_queued -= 1
                self._add(*payload)
            elif kind == "reset_prefix_cache":
                self.pool.reset_prefix_cache()
            elif payload in self._requests:
                self._finish_request(payload, notify=False)

    def _add(self, request: GenerationRequest, sink: Callable[[SeqEvent], None]) -> None:
        seqs: list[Sequence] = []
        for i in range(request.n):
            self._seq_ids += 1
            seq = Sequence(self._seq_ids, list(request.prompt_ids), len(request.prompt_ids), arrival=request.arrival)
            seq.leader = seqs[0] if seqs else None
            sampler = SequenceSampler(request.params, self.vocab_size, request.prompt_ids, index=i)
            matcher = self.grammars.matcher(request.grammar) if request.grammar is not None else None
            seq.owner = SeqState(request, i, sink, sampler, TextStream(self.tokenizer, request.stop), matcher)
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request.request_id] = seqs
        self.metrics.prompt_tokens += len(request.prompt_ids)

    def _finish_request(self, request_id: str, notify: bool) -> None:
        """Abort all sequences of a request still going; notify=True tells their sinks (finish_reason "abort")."""
        for seq in self._requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq)
                self.metrics.finished("abort")
                if notify:
                    self._emit(seq, "abort", None)

    def step(self) -> None:
        """Run one scheduled iteration of the model and hand out the new tokens."""
        now = time.monotonic()
        plan = self.scheduler.schedule()
        if not plan:
            time.sleep(0.001)  # only sequences waiting on a sibling's prompt: let it progress
            return
        plan.sort(key=lambda p: p[1] != 1)  # decodes (one token) first: they share one attention call
        segments, ids, last_rows, sampled = [], [], [], []
        row = 0
        for seq, n in plan:
            st: SeqState = seq.owner
            if st.first_scheduled_at is None:
                st.first_scheduled_at = now
                st.cached_tokens = seq.num_computed
                self.metrics.queue.observe(now - st.request.arrival)
            segments.append(Segment(seq.num_computed, n, seq.blocks))
            ids.extend(seq.tokens[seq.num_computed : seq.num_computed + n])
            row += n
            if seq.num_computed + n == len(seq.tokens):
                last_rows.append(row - 1)
                sampled.append(seq)
        batch = PagedBatch(self.store, segments)
        input_ids = torch.tensor(ids, dtype=torch.long).unsqueeze(0)
        forward = self.model
        if self._decode_forward is not None and batch.num_decodes == len(segments):
            forward = self._decode_forward
        out = forward(input_ids, position_ids=batch.position_ids, cache=batch, skip_logits=True)
        for seq, n in plan:
            self.scheduler.complete(seq, n)
        self.steps += 1
        if not sampled:
            return
        hidden = out.last_hidden_state[0, last_rows] if len(last_rows) < batch.num_tokens else out.last_hidden_state[0]
        logits = self.model.lm_head(hidden)
        states: list[SeqState] = [s.owner for s in sampled]
        allowed = [self.grammars.allowed(st.matcher) if st.matcher is not None else None for st in states]
        results = sample(logits, [st.sampler for st in states], allowed if any(a is not None for a in allowed) else None)
        done = time.monotonic()
        for seq, st, result in zip(sampled, states, results):
            self._advance(seq, st, result, done)

    def _advance(self, seq: Sequence, st: SeqState, result: SampleResult, now: float) -> None:
        token = result.token
        seq.tokens.append(token)
        st.output.append(token)
        st.new_tokens.append(token)
        st.new_logprobs.append(result)
        self.metrics.generation_tokens += 1
        if st.first_token_at is None:
            st.first_token_at = now
            self.metrics.ttft.observe(now - st.request.arrival)
        else:
            self.metrics.itl.observe(now - st.last_token_at)
        st.last_token_at = now
        req = st.request
        reason, stop_reason = None, None
        if st.matcher is not None:
            st.matcher.consume_token(token)
        if token in req.stop_token_ids or (token in self.eos_ids and not req.ignore_eos):
            reason, stop_reason = "stop", (token if token in req.stop_token_ids else None)
        elif st.text.add(token):
            reason, stop_reason = "stop", st.text.stopped_by
        elif st.matcher is not None and st.matcher.is_stopped():
            reason = "stop"
        elif len(st.output) >= req.max_tokens or len(seq.tokens) >= self.config.max_model_len:
            reason = "length"
        if reason is None:
            self._emit(seq, None, None)
            return
        self.scheduler.finish(seq)
        self.metrics.finished(reason)
        self.metrics.e2e.observe(now - req.arrival)
        self._emit(seq, reason, stop_reason)
        siblings = self._requests.get(req.request_id, [])
        if all(s.finished for s in siblings):
            self._requests.pop(req.request_id, None)

    def _emit(self, seq: Sequence, reason: str | None, stop_reason: str | int | None) -> None:
        st: SeqState = seq.owner
        text = st.text.take(final=reason is not None)
        event = SeqEvent(
            st.request.request_id,
            st.index,
            text,
            st.new_tokens,
            st.new_logprobs,
            reason,
            stop_reason,
            prompt_tokens=len(st.request.prompt_ids),
            completion_tokens=len(st.output),
            cached_tokens=st.cached_tokens,
        )
        st.new_tokens, st.new_logprobs = [], []
        st.sink(event)

    def kv_blocks_free(self) -> int:
        return self.pool.num_free
