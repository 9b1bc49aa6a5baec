"""The serving engine: one thread that runs the model step by step over whatever requests are live.

Callers (the HTTP layer, tests) `submit` a GenerationRequest with a callback and may `abort` it;
both only enqueue, so the engine thread alone touches the scheduler, the block pool and the model.
Each step: schedule (decodes first, chunked prefills into the token budget), run the model once on
the flat batch through a PagedBatch, compute logits only for sequences that reached their last known
token, sample, detokenise, check stop conditions, and call each request's callback with a SeqEvent.

A fault in one request fails that request alone (finish_reason "error" with a message), and the loop
goes on: a request is checked at admission; a fault while scheduling one sequence sets it aside; a sampling fault re-samples the step one sequence at a time
(each sequence's random stream and penalty counts restored first, so the others draw exactly what they
would have); a forward fault re-runs the step one sequence at a time (it rewrites the same cache
slots); a fault in one sequence's detokenising, grammar or callback fails its request. The happy path
pays only for saving each sampled sequence's generator state (about 1.4 us each per step).
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
from mlc.commands.serve.compiling import decode_kind
from mlc.commands.serve.draft import DraftModel, Proposal, sample_result, seeded_sampling
from mlc.commands.serve.metrics import ServeMetrics
from mlc.commands.serve.requests import GenerationRequest, SeqEvent
from mlc.commands.serve.scheduler import Scheduler, Sequence
from mlc.commands.serve.structured import GrammarLookahead
from mlc.commands.serve.textstream import TextStream
from mlc.kernels.paged_attention import PagedBatch, PagedKVStore, Segment
from mlc.kernels.sampling import SampleResult, SequenceSampler, sample

log = logging.getLogger("mlc.serve")

# /health fails when the loop has not come round for this long (a step takes well under a second here).
HEALTH_STALL_S = 30.0


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_batched_tokens: int = 512
    max_running: int = 128
    max_model_len: int = 2048
    enable_prefix_caching: bool = True
    # torch.compile the steps that are all decodes (the steady state; prefill steps stay eager, so the
    # many shapes of prompt chunks never wait on the compiler). See compiling.py.
    compile: bool = False
    # Speculative decoding: up to this many draft tokens per decode step (0: off), from the engine's draft model if it
    # has one (draft.py, decided in _verify_proposals), else by n-gram prompt lookup (speculative.py, decided in _verify).
    speculative_tokens: int = 0
    # KV eviction (kv_policy.py): "full" keeps every position; "h2o" or "scope" hold each sequence to kv_budget entries
    # per layer (scope: its prompt's entries plus kv_budget).
    kv_policy: str = "full"
    kv_budget: int = 0


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
    drafts: list[int] = field(default_factory=list)  # this step's draft tokens (speculative decoding)
    ngrams: Any = None  # its NgramIndex (speculative.py), made at its first draft
    proposal: Any = None  # this step's Proposal from the draft model (draft.py), or None


class Engine:
    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig, metrics: ServeMetrics | None = None, grammars: Any = None,
                 lora: Any = None, draft: Any = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.lora = lora  # a LoraSet (lora.py) whose wrappers the model runs through, or None
        mc = model.config
        self.draft: DraftModel | None = None  # proposes the speculative tokens when given (draft: a model of the same vocabulary)
        if draft is not None:
            if draft.config.vocab_size != mc.vocab_size or not config.speculative_tokens:
                raise ValueError("a draft model needs the model's vocabulary and speculative_tokens > 0")
            self.draft = DraftModel(draft, config.num_blocks, config.block_size)
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            dtype = torch.bfloat16  # quantised weights: keep activations and the cache in bf16
        self.dtype = dtype
        self.vocab_size = mc.vocab_size
        self.store = PagedKVStore(mc.num_hidden_layers, config.num_blocks, config.block_size, mc.num_key_value_heads, mc.head_dim, dtype)
        self.pool = KVBlockPool(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, config.max_batched_tokens, config.max_running)
        self.evictor = None  # a KVEvictor (kv_policy.py) when the cache evicts, else None: every position is kept
        if config.kv_policy != "full":
            from mlc.commands.serve.kv_policy import MIN_BUDGET, KVEvictor, KVPolicy, engine_conflict

            if config.kv_policy not in ("h2o", "scope") or config.kv_budget < MIN_BUDGET:
                raise ValueError(f"kv_policy must be full, h2o or scope and kv_budget at least {MIN_BUDGET}")
            if (conflict := engine_conflict(mc, config.enable_prefix_caching, config.speculative_tokens, config.compile)) is not None:
                raise ValueError(conflict)
            self.evictor = KVEvictor(KVPolicy(config.kv_policy, config.kv_budget), self.store, self.pool)
        self.metrics = metrics or ServeMetrics("model")
        self.grammars = grammars
        self.eos_ids = set(tokenizer.eos_token_ids)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = 0
        self.num_queued = 0  # sequences submitted, not yet admitted to the scheduler (for --max-queue)
        self.steps = 0
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what ended the loop, if anything did
        self.running = False  # the loop is alive
        self.heartbeat = 0.0  # monotonic time the loop last came round
        self._decode_forward = None  # the compiled model.forward (compiling.py), used for decode steps of compiled_kinds
        self.compiled_kinds: set[str] = set()
        self.compiler: Any = None  # the DecodeCompiler of warm_up or compile_in_background

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
            self.num_queued += max(1, request.n)
        self._inbox.put(("add", (request, sink)))
        self._wake.set()

    def abort(self, request_id: str, notify: bool = False) -> None:
        """Stop a request and free its blocks; notify=True ends its sequences with finish_reason "abort" events."""
        self._inbox.put(("abort", (request_id, notify)))
        self._wake.set()

    def call(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run fn() in the engine thread between steps (work that needs torch or the model, such as embeddings);
        done(result, None) or done(None, exception) is then called from the engine thread. A failing fn fails only its caller."""
        self._inbox.put(("call", (fn, done)))
        self._wake.set()

    def embed(self, ids: list[int]) -> torch.Tensor:
        """The mean over the tokens of the model's last (normed) hidden state, L2-normalised, in fp32 (engine thread only).

        Run without the paged cache (nothing is kept): the same hidden states the model computes for generation.
        """
        out = self.model(torch.tensor([ids], dtype=torch.long), skip_logits=True)
        return torch.nn.functional.normalize(out.last_hidden_state[0].float().mean(0), dim=0)

    def healthy(self, max_stall: float = HEALTH_STALL_S) -> bool:
        """True while the loop runs and came round within max_stall seconds."""
        return self.running and time.monotonic() - self.heartbeat < max_stall

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
        self.running, self.heartbeat = True, time.monotonic()
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    self.heartbeat = time.monotonic()
                    self._drain_inbox()
                    if not self.scheduler.has_work():
                        self._wake.wait(0.5)
                        self._wake.clear()
                        continue
                    self.step()
        except BaseException as e:  # a bug in the loop itself: fail every live request instead of hanging them
            log.exception("the engine loop failed")
            self.error = e
            for rid in list(self._requests):
                self._fail_request(rid, f"the engine loop failed: {e!r}")
        finally:
            self.running = False

    def warm_up(self) -> None:
        """Compile the decode step now, in the calling thread, before serving (with `compile`; a no-op without).

        See compiling.py; a failed compile is logged and leaves the engine eager. Metrics and the KV pool are untouched.
        """
        if self.config.compile:
            from mlc.commands.serve.compiling import DecodeCompiler

            self.compiler = DecodeCompiler(self)
            self.compiler.run(inline=True)

    def compile_in_background(self) -> None:
        """Compile the decode step in a background thread while this engine serves eagerly (with `compile`; a no-op
        without); each kind of decode step is swapped in between two steps once it is compiled (see compiling.py)."""
        if self.config.compile:
            from mlc.commands.serve.compiling import DecodeCompiler

            self.compiler = DecodeCompiler(self)
            self.compiler.start()

    def use_compiled(self, forward: Any, kinds: list[str]) -> None:
        """Run decode steps of these kinds through forward from the next step on (engine thread, or before the loop runs)."""
        self._decode_forward = forward
        self.compiled_kinds.update(kinds)

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
                    self.num_queued -= max(1, payload[0].n)
                self._add(*payload)
            elif kind == "reset_prefix_cache":
                self.pool.reset_prefix_cache()
            elif kind == "call":
                fn, done = payload
                try:
                    result, error = fn(), None
                except Exception as e:  # noqa: BLE001 - the caller's failure, handed back to it
                    result, error = None, e
                try:
                    done(result, error)
                except Exception as e:  # noqa: BLE001 - a caller that has gone away
                    log.debug("dropped the result of an engine call: %s", e)
            elif payload[0] in self._requests:
                self._finish_request(payload[0], notify=payload[1])

    def _admission_error(self, r: GenerationRequest) -> str | None:
        """Why the engine cannot run r, or None. The HTTP edge refuses all of these first; this is the engine's own guard."""
        vocab, ids = self.vocab_size, r.prompt_ids
        if not ids:
            return "the prompt is empty"
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            return f"prompt token ids must be integers from 0 to {vocab - 1}"
        if len(ids) >= self.config.max_model_len:
            return f"the prompt has {len(ids)} tokens; the maximum model length is {self.config.max_model_len}"
        if r.max_tokens < 1 or r.n < 1:
            return "max_tokens and n must be at least 1"
        if not all(0 <= t < vocab for t in r.stop_token_ids) or not all(0 <= t < vocab for t in r.params.logit_bias):
            return f"stop_token_ids and logit_bias keys must be token ids from 0 to {vocab - 1}"
        if r.params.logprobs is not None and not 0 <= r.params.logprobs <= vocab:
            return "logprobs is out of range"
        return None

    def _add(self, request: GenerationRequest, sink: Callable[[SeqEvent], None]) -> None:
        seqs: list[Sequence] = []
        try:
            if (problem := self._admission_error(request)) is not None:
                raise ValueError(problem)
            for i in range(request.n):
                self._seq_ids += 1
                seq = Sequence(self._seq_ids, list(request.prompt_ids), len(request.prompt_ids), arrival=request.arrival)
                if request.adapter is not None:
                    seq.root_hash = seq.parent_hash = request.adapter.cache_salt
                # Siblings share their prompt's blocks, unless eviction will rewrite those blocks in place.
                seq.leader = seqs[0] if seqs and self.evictor is None else None
                sampler = SequenceSampler(request.params, self.vocab_size, request.prompt_ids, index=i)
                matcher = self.grammars.matcher(request.grammar) if request.grammar is not None else None
                seq.owner = SeqState(request, i, sink, sampler, TextStream(self.tokenizer, request.stop), matcher)
                seqs.append(seq)
        except Exception as e:  # noqa: BLE001 - refuse this request, keep serving the others
            log.warning("request %s refused by the engine: %s", request.request_id, e)
            for i in range(max(1, request.n)):
                self.metrics.finished("error")
                _notify(sink, SeqEvent(request.request_id, i, "", [], [], "error", error=_describe(e)))
            return
        for seq in seqs:
            self.scheduler.add(seq)
        self._requests[request.request_id] = seqs
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))

    def _finish_request(self, request_id: str, notify: bool) -> None:
        """Abort all sequences of a request still going; notify=True tells their sinks (finish_reason "abort")."""
        seqs = self._requests.pop(request_id, [])
        for seq in seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                self._record_finish(seq, "abort")
                if notify:
                    self._emit(seq, "abort", None)
        self._request_done(seqs)

    def _fail_request(self, request_id: str, message: str) -> None:
        """End every unfinished sequence of a request with finish_reason "error" and free its blocks."""
        seqs = self._requests.pop(request_id, [])
        for seq in seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                self._record_finish(seq, "error")
                self._emit(seq, "error", None, error=message)
        self._request_done(seqs)

    def _request_done(self, seqs: list[Sequence]) -> None:
        if seqs:
            self.metrics.max_generation_len.observe(max(len(s.owner.output) for s in seqs))

    def _fail(self, seq: Sequence, e: BaseException, where: str) -> None:
        st: SeqState = seq.owner
        log.warning("request %s failed while %s: %s", st.request.request_id, where, _describe(e))
        self._fail_request(st.request.request_id, f"internal error while {where}: {_describe(e)}")

    def step(self) -> None:
        """Run one scheduled iteration of the model and hand out the new tokens; a fault fails only its requests.

        A fault in scheduling one sequence fails its request (the scheduler sets it aside). A fault the
        step cannot pin on a request (the scheduler's own bookkeeping) fails every live request, since
        their state is then unknown, and the loop goes on with an empty, consistent pool.
        """
        try:
            plan = self.scheduler.schedule()
            for seq, e in self.scheduler.faults:
                self._fail(seq, e, "scheduling")
            if self.scheduler.faults:
                self.scheduler.faults.clear()
                plan = [(seq, n) for seq, n in plan if not seq.finished]  # a failed request's siblings, freed above
            if not plan:
                time.sleep(0.001)  # only sequences waiting on a sibling's prompt: let it progress
                return
            if self.config.speculative_tokens:
                plan = self._draft(plan)
            plan.sort(key=lambda p: p[1] != 1)  # decodes (one token) first: they share one attention call
            try:
                out = self._forward(plan)
            except Exception as e:  # noqa: BLE001
                if len(plan) == 1:
                    self._fail(plan[0][0], e, "running the model")
                    return
                for item in plan:  # find the sequence at fault: one at a time (each rewrites the same cache slots)
                    if item[0].finished:  # a sibling of a request that failed earlier in this loop
                        continue
                    try:
                        self._run([item], self._forward([item]))
                    except Exception as e1:  # noqa: BLE001
                        self._fail(item[0], e1, "running the model")
                return
            self._run(plan, out)
        except Exception as e:  # noqa: BLE001
            log.exception("engine step failed; failing every live request")
            for rid in list(self._requests):
                self._fail_request(rid, f"internal error in the engine step: {_describe(e)}")

    def _forward(self, plan: list[tuple[Sequence, int]]) -> tuple[torch.Tensor | None, int, list[Sequence]]:
        """One model call on the flat batch of plan: (logits, tokens run, the sequences that reached their last token).

        The logits hold one row per such sequence, in order; a sequence with draft tokens gets a row for its last
        token and one for each draft (see _verify).
        """
        now = time.monotonic()
        segments, ids, last_rows, sampled = [], [], [], []
        row = 0
        for seq, n in plan:
            st: SeqState = seq.owner
            if st.first_scheduled_at is None:
                st.first_scheduled_at = now
                st.cached_tokens = seq.num_computed
                self.metrics.queue.observe(now - st.request.arrival)
            segments.append(Segment(seq.num_computed - seq.num_evicted, n, seq.blocks, seq.num_computed if seq.num_evicted else None))
            if st.drafts:  # the last token, then the drafts (not in seq.tokens until accepted)
                ids.append(seq.tokens[seq.num_computed])
                ids.extend(st.drafts)
                last_rows.extend(range(row, row + n))
                sampled.append(seq)
                row += n
                continue
            ids.extend(seq.tokens[seq.num_computed : seq.num_computed + n])
            row += n
            if seq.num_computed + n == len(seq.tokens):
                last_rows.append(row - 1)
                sampled.append(seq)
        batch = PagedBatch(self.store, segments) if self.evictor is None else self.evictor.batch(segments)
        input_ids = torch.tensor(ids, dtype=torch.long).unsqueeze(0)
        forward = self.model
        if self._decode_forward is not None and batch.num_decodes == len(segments) and \
                decode_kind([s.start for s in segments]) in self.compiled_kinds:
            forward = self._decode_forward
        if self.lora is not None:
            self.lora.batch.groups = _adapter_rows(plan)
        try:
            out = forward(input_ids, position_ids=batch.position_ids, cache=batch, skip_logits=True)
        finally:
            if self.lora is not None:
                self.lora.batch.groups = []
        if not sampled:
            return None, batch.num_tokens, sampled
        hidden = out.last_hidden_state[0, last_rows] if len(last_rows) < batch.num_tokens else out.last_hidden_state[0]
        return self.model.lm_head(hidden), batch.num_tokens, sampled

    def _run(self, plan: list[tuple[Sequence, int]], forwarded: tuple[torch.Tensor | None, int, list[Sequence]]) -> None:
        """Book the computed tokens, then sample and advance the sequences that reached their last token."""
        logits, num_tokens, sampled = forwarded
        for seq, n in plan:
            self.scheduler.complete(seq, 1 if seq.owner.drafts else n)  # drafts count once accepted (_verify)
        if self.evictor is not None:
            self.evictor.after_step(plan)
        self.steps += 1
        self.metrics.iteration_tokens.observe(num_tokens)
        if not sampled:
            return
        plain, rows, row = [], [], 0
        speculative: list[tuple[Sequence, int]] = []
        proposed: list[tuple[Sequence, int]] = []
        for seq in sampled:
            if seq.owner.proposal is not None:
                proposed.append((seq, row))
                row += 1 + len(seq.owner.drafts)
            elif seq.owner.drafts:
                speculative.append((seq, row))
                row += 1 + len(seq.owner.drafts)
            else:
                plain.append(seq)
                rows.append(row)
                row += 1
        done = time.monotonic()
        for seq, start in speculative:
            if seq.finished:  # a sibling failed earlier in this step
                seq.owner.drafts = []
                continue
            try:
                self._verify(seq, logits[start : start + 1 + len(seq.owner.drafts)], done)
            except Exception as e:  # noqa: BLE001
                seq.owner.drafts = []
                if not seq.finished:
                    self._fail(seq, e, "verifying draft tokens")
        if proposed:
            self._verify_proposals(proposed, logits, done)
        if not plain:
            return
        results = self._sample(logits if len(plain) == row else logits[rows], plain)
        self.metrics.generation_tokens.inc(sum(isinstance(r, SampleResult) for r in results))
        for seq, result in zip(plain, results):
            if seq.finished:  # a sibling failed earlier in this step
                continue
            if not isinstance(result, SampleResult):
                self._fail(seq, result, "sampling")
                continue
            try:
                self._advance(seq, seq.owner, result, done)
            except Exception as e:  # noqa: BLE001 - detokenising, the grammar, or the request's own callback
                self._fail(seq, e, "handing out a token")

    def _draft(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Give decodes draft tokens by n-gram prompt lookup (or the draft model's), within the step's token budget and the blocks free."""
        if self.draft is not None:
            return self._propose(plan)
        from mlc.commands.serve.speculative import NgramIndex

        spare = self.config.max_batched_tokens - sum(n for _, n in plan)
        out = []
        for seq, n in plan:
            st: SeqState = seq.owner
            st.drafts = []
            room = min(self.config.speculative_tokens, spare, st.request.max_tokens - len(st.output) - 1,
                       self.config.max_model_len - len(seq.tokens) - 1)
            if n == 1 and room > 0 and seq.num_computed + 1 == len(seq.tokens):
                try:
                    st.ngrams = st.ngrams or NgramIndex()
                    drafts = st.ngrams.propose(seq.tokens, room)
                    if st.matcher is not None:
                        drafts = _grammar_drafts(st.matcher, drafts, room)
                    if drafts and self.scheduler.reserve(seq, 1 + len(drafts)):
                        st.drafts = drafts
                        n = 1 + len(drafts)
                        spare -= len(drafts)
                except Exception as e:  # noqa: BLE001 - no drafts for this sequence; it decodes as usual
                    log.warning("drafting for %s failed: %s", st.request.request_id, _describe(e))
                    st.drafts = []
            out.append((seq, n))
        return out

    def _verify(self, seq: Sequence, logits: torch.Tensor, now: float) -> None:
        """Accept the longest run of draft tokens the model itself samples, then one more token of its own.

        Row i of logits is the model's distribution after the last token and drafts 1..i. Each row is sampled in turn
        exactly as a decode step would (the sequence's own sampler: its seed's stream, penalties, logit_bias), and the
        token is handed out; while it equals the next draft, the draft's keys and values (computed in this step) are
        kept and the next row is sampled. The first token that differs, or the row after the last draft, ends the step.
        That is rejection sampling for a draft that proposes one token with certainty: the draft d is kept with
        probability p(d), and a rejected position gets a token drawn from p without d, renormalised, so every token
        comes from the model's own distribution. Greedy output is the non-speculative output, and a seeded request
        draws the same random numbers for the same tokens. A request with a grammar masks each row by its matcher after
        the tokens handed out before it, as a step without drafts would (the matcher consumes only handed-out tokens).
        """
        st: SeqState = seq.owner
        drafts, st.drafts = st.drafts, []
        self.metrics.spec_drafts.inc()
        self.metrics.spec_draft_tokens.inc(len(drafts))
        for i in range(len(drafts) + 1):
            allowed = self._allowed(st)
            result = sample(logits[i : i + 1], [st.sampler], [allowed] if allowed is not None else None)[0]
            self.metrics.generation_tokens.inc()
            self._advance(seq, st, result, now)
            if i == len(drafts) or result.token != drafts[i]:
                return
            self.metrics.spec_accepted_tokens.inc()  # a kept draft, also one that ends the request
            if seq.finished:
                return
            self.scheduler.complete(seq, 1)  # the accepted draft's keys and values were computed in this step

    def _propose(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Give decodes the draft model's proposals (draft.py), within the step's token budget and the blocks free.

        A sequence without room for drafts still gets an empty proposal when it samples with a seed, so that every token
        of a seeded request is decided by the same rule (see draft.py). A request with a grammar proposes under it
        (a GrammarLookahead: structured.py); one whose matcher cannot be copied decodes this step without drafts.
        """
        spare = self.config.max_batched_tokens - sum(n for _, n in plan)
        items: list[tuple[Sequence, Any, int]] = []
        guides: list[Any] = []
        for seq, n in plan:
            st: SeqState = seq.owner
            st.drafts, st.proposal = [], None
            if n == 1 and seq.num_computed + 1 == len(seq.tokens):
                try:
                    guide = GrammarLookahead(self.grammars, st.matcher) if st.matcher is not None else None
                except Exception as e:  # noqa: BLE001 - its own matcher decides at sampling time
                    log.warning("drafting for %s failed: %s", st.request.request_id, _describe(e))
                    continue
                k = max(0, min(self.config.speculative_tokens, spare, st.request.max_tokens - len(st.output) - 1,
                               self.config.max_model_len - len(seq.tokens) - 1))
                if k and not self.scheduler.reserve(seq, 1 + k):
                    k = 0
                if k or seeded_sampling(st.sampler):
                    items.append((seq, st.sampler, k))
                    guides.append(guide)
                    spare -= k
        if items:
            try:
                proposals = self.draft.propose(items, guides)
            except Exception as e:  # noqa: BLE001 - this step decodes without drafts
                log.warning("the draft model failed; decoding this step without drafts: %s", _describe(e))
                for seq, _, _ in items:
                    seq.num_draft_computed = min(seq.num_draft_computed, len(seq.tokens))  # drop drafts' keys and values
                proposals = []
            for (seq, _, _), prop in zip(items, proposals):
                seq.owner.proposal, seq.owner.drafts = prop, prop.tokens
        return [(seq, 1 + len(seq.owner.drafts)) if seq.owner.proposal is not None else (seq, n) for seq, n in plan]

    def _verify_proposals(self, items: list[tuple[Sequence, int]], logits: torch.Tensor, now: float) -> None:
        """Decide the draft model's proposals by rejection sampling (draft.py); row `start` of logits is each one's p_1.

        Sequences whose last position waits for the draft's distribution there (seeded sampling, all drafts kept) get
        it from one more draft call, batched.
        """
        waiting: list[tuple[Sequence, torch.Tensor]] = []
        for seq, start in items:
            st: SeqState = seq.owner
            prop, st.proposal, st.drafts = st.proposal, None, []
            if seq.finished:  # a sibling failed earlier in this step
                continue
            try:
                if self._verify_proposal(seq, prop, logits[start : start + 1 + len(prop.tokens)], now):
                    waiting.append((seq, logits[start + len(prop.tokens)]))
            except Exception as e:  # noqa: BLE001
                if not seq.finished:
                    self._fail(seq, e, "verifying draft tokens")
        if not waiting:
            return
        try:
            rows = self.draft.logits([(seq, []) for seq, _ in waiting])
        except Exception as e:  # noqa: BLE001 - the last position draws from the model's distribution alone
            log.warning("the draft model failed; drawing the bonus tokens without it: %s", _describe(e))
            rows = None
        for i, (seq, row) in enumerate(waiting):
            if seq.finished:
                continue
            st = seq.owner
            try:
                position, allowed = len(seq.tokens), self._allowed(st)
                if rows is None:
                    token = self.draft.bonus(row, st.sampler, position, allowed)
                else:
                    drafted, q = self.draft.draw(rows[i], st.sampler, position, allowed)
                    token, _ = self.draft.decide(row, st.sampler, q, drafted, position, allowed)
                self._hand_out(seq, row, token, now)
            except Exception as e:  # noqa: BLE001
                if not seq.finished:
                    self._fail(seq, e, "verifying draft tokens")

    def _verify_proposal(self, seq: Sequence, prop: Proposal, logits: torch.Tensor, now: float) -> bool:
        """Hand out the kept drafts and the token that ends the step; True when that last token waits for the draft."""
        st: SeqState = seq.owner
        k = len(prop.tokens)
        if k:
            self.metrics.spec_drafts.inc()
            self.metrics.spec_draft_tokens.inc(k)
        try:
            for i in range(k + 1):
                position = len(seq.tokens)
                if i == k and prop.bonus_from_draft:
                    return True
                allowed = self._allowed(st)  # the grammar after the tokens handed out: the draft's mask there too
                if i < k:
                    token, kept = self.draft.decide(logits[i], st.sampler, prop.probs[i], prop.tokens[i], position, allowed)
                else:
                    token, kept = self.draft.bonus(logits[i], st.sampler, position, allowed), False
                self._hand_out(seq, logits[i], token, now)
                if kept:
                    self.metrics.spec_accepted_tokens.inc()  # also one that ends the request
                if seq.finished or not kept:
                    return False
                self.scheduler.complete(seq, 1)  # the kept draft's keys and values were computed in this step
            return False
        finally:
            # The draft's cache is right up to the last token handed out (every earlier one was its own draft).
            seq.num_draft_computed = min(seq.num_draft_computed, len(seq.tokens) - 1)

    def _allowed(self, st: SeqState) -> torch.Tensor | None:
        """The mask of the tokens st's grammar accepts next, or None without a grammar."""
        return self.grammars.allowed(st.matcher) if st.matcher is not None else None

    def _hand_out(self, seq: Sequence, row: torch.Tensor, token: int, now: float) -> None:
        st: SeqState = seq.owner
        st.sampler.record(token)
        self.metrics.generation_tokens.inc()
        self._advance(seq, st, sample_result(row, token, st.sampler), now)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult | BaseException]:
        """One result per sequence: batched; after a fault, one sequence at a time from the saved random state."""
        states: list[SeqState] = [s.owner for s in seqs]
        samplers = [st.sampler for st in states]
        allowed: list[Any] = []
        for st in states:
            try:
                allowed.append(self.grammars.allowed(st.matcher) if st.matcher is not None else None)
            except Exception as e:  # noqa: BLE001
                allowed.append(e)
        saved = [_save_sampler(s) for s in samplers]
        if not any(isinstance(a, BaseException) for a in allowed):
            try:
                return sample(logits, samplers, allowed if any(a is not None for a in allowed) else None)
            except Exception:  # noqa: BLE001 - find the sequence at fault below
                pass
        results: list[SampleResult | BaseException] = []
        for i, s in enumerate(samplers):
            if isinstance(allowed[i], BaseException):
                results.append(allowed[i])
                continue
            _restore_sampler(s, saved[i])
            try:
                results.append(sample(logits[i : i + 1], [s], [allowed[i]] if allowed[i] is not None else None)[0])
            except Exception as e:  # noqa: BLE001
                results.append(e)
        return results

    def _advance(self, seq: Sequence, st: SeqState, result: SampleResult, now: float) -> None:
        token = result.token
        seq.tokens.append(token)
        st.output.append(token)
        st.new_tokens.append(token)
        st.new_logprobs.append(result)
        if st.first_token_at is None:
            st.first_token_at = now
            self.metrics.ttft.observe(now - st.request.arrival)
        else:
            self.metrics.itl.observe(now - st.last_token_at)
            self.metrics.tpot.observe(now - st.last_token_at)
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
        self._record_finish(seq, reason, now)
        siblings = self._requests.get(req.request_id, [])
        if all(s.finished for s in siblings):
            self._request_done(self._requests.pop(req.request_id))
        self._emit(seq, reason, stop_reason)

    def _record_finish(self, seq: Sequence, reason: str, now: float | None = None) -> None:
        st: SeqState = seq.owner
        if st.index == 0:
            self.metrics.params_n.observe(st.request.n)
            self.metrics.max_tokens.observe(st.request.max_tokens)
        self.metrics.finished(reason, len(st.request.prompt_ids), len(st.output), st.request.arrival, st.first_scheduled_at,
                              st.first_token_at, now if now is not None else time.monotonic())

    def _emit(self, seq: Sequence, reason: str | None, stop_reason: str | int | None, error: str | None = None) -> None:
        st: SeqState = seq.owner
        try:
            text = st.text.take(final=reason is not None)
        except Exception:  # noqa: BLE001 - a failed detokeniser still lets the request end
            text = ""
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
            error=error,
        )
        st.new_tokens, st.new_logprobs = [], []
        if reason is None:
            st.sink(event)  # a raising sink fails the request (see _run)
        else:
            _notify(st.sink, event)


def _adapter_rows(plan: list[tuple[Sequence, int]]) -> list[tuple[Any, torch.Tensor | None]]:
    """For each LoRA adapter in a step, the rows of the flat batch that hold its requests' tokens (None: all of them)."""
    rows: dict[Any, list[int]] = {}
    start = 0
    for seq, n in plan:
        adapter = seq.owner.request.adapter
        if adapter is not None:
            rows.setdefault(adapter, []).extend(range(start, start + n))
        start += n
    return [(a, None if len(r) == start else torch.tensor(r, dtype=torch.long)) for a, r in rows.items()]


def _grammar_drafts(matcher: Any, drafts: list[int], room: int) -> list[int]:
    """A grammar request's n-gram drafts up to the first token its grammar refuses (checked without consuming), or the
    tokens the grammar forces next (keys, quotes, separators: llguidance's fast-forward tokens) when those are more."""
    drafts = drafts[: matcher.validate_tokens(drafts)] if drafts else drafts
    forced = matcher.compute_ff_tokens()[:room]
    if len(forced) > len(drafts):
        drafts = forced[: matcher.validate_tokens(forced)]
    return drafts


def _notify(sink: Callable[[SeqEvent], None], event: SeqEvent) -> None:
    """Hand a final event to a request's sink; a sink that raises (its client has gone) is only logged."""
    try:
        sink(event)
    except Exception as e:  # noqa: BLE001
        log.debug("dropped the final event of %s: %s", event.request_id, e)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _save_sampler(s: SequenceSampler) -> tuple[Any, ...]:
    """What `sample` may change in a sequence's sampler: its random stream and its penalty counts."""
    counts = (s.counts.clone(), s.seen.clone()) if s.counts is not None else None
    return s.generator.get_state(), counts


def _restore_sampler(s: SequenceSampler, saved: tuple[Any, ...]) -> None:
    state, counts = saved
    s.generator.set_state(state)
    if counts is not None:
        s.counts, s.seen = counts[0].clone(), counts[1].clone()
