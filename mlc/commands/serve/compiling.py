"""`mlc serve --compile`: compile the decode step in the background, swap it in kind by kind, keep the code on disk.

The server answers at once and decodes eagerly while a thread compiles `model.forward` with torch.compile
on throwaway requests run by a scratch engine (the same weights and step shapes; its own KV pool, whose cache
tensors have the real cache's shape but are never written past a few blocks, so they take no memory). A decode
step has one of a few kinds (KINDS: one sequence; several, of equal or unequal lengths; below or at 16
sequences, where the quantised kernels change path); once the throwaway requests have compiled a kind, the
engine is handed the compiled step for it through Engine.call, so the swap happens between two engine steps
and never inside one. Steps of kinds not compiled yet, and prefill steps (whose many prompt-chunk shapes would
each cost a compile), stay eager. A failure in the compile thread only logs one line: the server goes on
eagerly. For an int4 model whose layers run a small decode step as one native call each (models/native_decode.py),
the kinds below 16 sequences are left eager (eager_kinds): that beats any graph that calls the kernels one by one.

torch's inductor keeps compiled graphs (FX-graph and AOTAutograd caches) and the built kernels in
TORCHINDUCTOR_CACHE_DIR; that is pointed at $MLC_CACHE/compile/<key>, the key naming what the code depends on (the
model's shapes and layer types, dtypes, torch and mlc versions, the CPU's vector ISA, the thread count), so a second
start with the same model loads its code instead of building it. That works only if the second start asks for the
same graphs as the first: the step inputs that vary (DYNAMIC_INPUTS) are therefore marked dynamic from the first
compile on, so each kind's graph depends on nothing but its kind. Left to dynamo's "automatic dynamic", a kind was
first compiled with static sizes and then again with the sizes that changed, and with dynamo's record of those kept
on disk (PGO) a warm start compiled the batch-1 kind under the dimensions the later kinds had made dynamic: a graph
the cold start never built, so it was built again on every first warm start (measured: 4 of 5 graphs loaded, the
batch-1 one built, 31 s to its swap instead of 11 s).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from mlc import console

# Each kind of decode step with the throwaway requests (prompt lengths, all decoded together) that compile it, batch
# 1 first (the common step, swapped in before the rest are compiled). With DYNAMIC_INPUTS the first round compiles
# the kind's graph; the second, with another batch size, runs it again, so that whatever else varied with the batch
# would be compiled here rather than while serving. After these, serving 1 to 32 concurrent requests compiled nothing
# more on SmolLM2.
KINDS: list[tuple[str, list[tuple[int, ...]]]] = [
    ("single", [(5,)]),  # 4 tokens each: the context grows from step to step
    ("ragged", [(5, 8), (5, 8, 11)]),
    ("equal", [(6, 6), (6, 6, 6)]),
    ("ragged-16", [tuple(range(5, 21))]),
    ("equal-16", [(6,) * 16]),
]
WARM_UP_TOKENS = 4
# The inputs of a decode step whose sizes or values change from step to step (model.forward's arguments and the
# PagedBatch it attends over): the batch size and the longest context. Marked dynamic at the first compile (sizes 0
# and 1 stay specialised, so the batch-1 kind keeps its batch dimension static), so that every start compiles the
# same graphs whatever it compiled before. Nothing else varies between steps of a kind on the models mlc serves
# (TORCH_LOGS=recompiles shows one compile per kind); a new input that did would be made dynamic on its second value
# by dynamo's automatic dynamic, the same way on every start, so it would cost a compile but not the cache.
DYNAMIC_INPUTS = ("L['input_ids']", "L['position_ids']", "L['cache'].write_slots", "L['cache'].num_decodes",
                  "L['cache'].decode_max", "L['cache'].decode_lens", "L['cache'].decode_gather")
# One compile at a time in a process (several models, `mlc serve A B`): they would share the cores anyway, and
# TORCHINDUCTOR_CACHE_DIR, which names each one's cache directory, is one setting for the whole process.
_ONE_AT_A_TIME = threading.Lock()


def decode_kind(starts: list[int]) -> str:
    """The kind of a decode-only step whose sequences decode at these positions (one token each)."""
    if len(starts) == 1:
        return "single"
    kind = "equal" if min(starts) == max(starts) else "ragged"
    return f"{kind}-16" if len(starts) >= 16 else kind


def kinds_for(max_running: int) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The kinds a server running at most max_running sequences at once can meet (no 16-sequence steps below 16)."""
    return [(k, r) for k, r in KINDS if (max_running >= 2 or k == "single") and (max_running >= 16 or not k.endswith("-16"))]


def eager_kinds(model: Any, kinds: list[tuple[str, list[tuple[int, ...]]]]) -> list[str]:
    """The kinds better left eager: steps of fewer than 16 sequences of a model whose every layer then runs as one native
    call (int4 layers, models/native_decode.py), which a compiled graph cannot call. Measured on SmolLM2 int4, batch 1,
    quiet: 141.9 tok/s eager against 84.2 with the compiled step (benchmarks/RESULTS.md, issue 19)."""
    from mlc.models import native_decode

    if not native_decode.runs_every_layer(model):
        return []
    return [k for k, _ in kinds if not k.endswith("-16")]


def cache_key(model: Any, dtype: torch.dtype) -> str:
    """What the compiled code depends on, hashed: a different model shape, scheme, version or CPU gets its own directory."""
    from mlc import __version__

    layers = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()})
    tensors = sorted({f"{t.dtype}" for t in model.state_dict().values()})
    parts = [repr(model.config), *layers, *tensors, str(dtype), torch.__version__, __version__,
             torch.backends.cpu.get_cpu_capability(), str(torch.get_num_threads())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def use_compile_cache(model: Any, dtype: torch.dtype) -> Path:
    """Point inductor's on-disk caches at $MLC_CACHE/compile/<key> (made if missing) and return that directory."""
    from mlc.paths import cache_dir

    path = cache_dir() / "compile" / cache_key(model, dtype)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor at each lookup, so setting it now is enough
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    # Not dynamo's on-disk record of dimensions that turned dynamic (PGO): it changes the graphs a start asks for with
    # what earlier starts compiled. DYNAMIC_INPUTS gives every start the same dynamic graphs from the first compile.
    torch._dynamo.config.automatic_dynamic_local_pgo = False
    torch.compiler.config.dynamic_sources = ",".join(DYNAMIC_INPUTS)
    return path


def cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's FX-graph cache in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"]), int(counters["inductor"]["fxgraph_cache_miss"])


class DecodeCompiler:
    """Compiles an engine's decode step on a scratch engine and hands each kind to the engine as it becomes ready.

    `start` runs it in a daemon thread (the server); `run` in the calling thread (warm-up before serving, tests).
    state: "compiling", then "compiled" or "failed" (error says why); ready lists the kinds swapped in so far.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.kinds = kinds_for(engine.config.max_running)
        self.eager = eager_kinds(engine.model, self.kinds)  # served eagerly on purpose, never compiled
        self.kinds = [(k, r) for k, r in self.kinds if k not in self.eager]
        self.state = "compiling"
        self.error: str | None = None
        self.ready: list[str] = []
        self.cache: Path | None = None
        self.cache_hits = self.cache_misses = 0
        self.started = time.monotonic()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="mlc-serve-compile", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, inline: bool = False) -> None:
        """Compile every kind in turn; inline=True installs each directly (the engine loop is not running)."""
        with _ONE_AT_A_TIME:
            self._run(inline)

    def _run(self, inline: bool) -> None:
        engine = self.engine
        self.started = time.monotonic()
        hits0, misses0 = cache_counts()
        if self.eager:
            console.info(f"decode steps of fewer than 16 sequences stay eager ({', '.join(self.eager)}): each layer of this "
                         "int4 model runs as one native call there, faster than a compiled graph")
        if not self.kinds:
            self.state = "compiled"
            return
        try:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            self.cache = use_compile_cache(engine.model, engine.dtype)
            where = "" if inline else " in the background, decoding eagerly until each kind is ready"
            console.info(f"compiling the decode step{where} (torch.compile, {len(self.kinds)} kinds of step; cache {self.cache})")
            scratch = self._scratch_engine()
            forward = torch.compile(engine.model.forward)
            scratch.use_compiled(forward, [k for k, _ in self.kinds])
            # KINDS' order: batch 1 (the common step) first, swapped in before any other kind is compiled. A start
            # stopped part-way left a prefix of this order in the cache, so the next one loads those before building.
            for kind, rounds in self.kinds:
                before = cache_counts()
                self._compile_kind(scratch, kind, rounds)
                counts = tuple(b - a for a, b in zip(before, cache_counts()))
                if inline:
                    engine.use_compiled(forward, [kind])
                    self._swapped(kind, counts, None)
                else:
                    engine.call(lambda kind=kind: engine.use_compiled(forward, [kind]),
                                lambda _, error, kind=kind, counts=counts: self._swapped(kind, counts, error))
            hits, misses = cache_counts()
            self.cache_hits, self.cache_misses = hits - hits0, misses - misses0
            console.info(f"compiled the decode step in {time.monotonic() - self.started:.1f}s: {self.cache_hits} graphs loaded "
                         f"from the cache, {self.cache_misses} built")
            self.state = "compiled"
        except Exception as e:  # noqa: BLE001 - no working compiler toolchain, an unsupported op: keep serving eagerly
            self.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.state = "failed"
            console.warn(f"torch.compile of the decode step failed, serving eagerly: {self.error}")

    def _swapped(self, kind: str, counts: tuple[int, int], error: BaseException | None) -> None:
        if error is not None:  # cannot happen short of a bug in use_compiled; say so rather than claim the swap
            console.warn(f"could not swap in the compiled {kind} decode step: {error}")
            return
        self.ready.append(kind)
        console.info(f"compiled decode step '{kind}' in use after {time.monotonic() - self.started:.1f}s "
                     f"(graphs: {counts[0]} loaded from the cache, {counts[1]} built)")

    def _scratch_engine(self) -> Any:
        """An engine on the same weights whose KV cache tensors have the real cache's shapes (so the compiled code's
        shape guards hold for the real one) but are allocated lazily: only the few blocks the warm-up writes take memory."""
        from dataclasses import replace

        from mlc.commands.serve.metrics import ServeMetrics

        engine, config = self.engine, self.engine.config
        need = max(sum(-(-(n + WARM_UP_TOKENS) // config.block_size) for n in lengths) for _, rounds in self.kinds for lengths in rounds)
        config = replace(config, num_blocks=min(config.num_blocks, need + 2), enable_prefix_caching=False, compile=False,
                         speculative_tokens=0)
        scratch = type(engine)(engine.model, engine.tokenizer, config, ServeMetrics("compile"))
        real = engine.store
        scratch.store.k = [torch.empty(t.shape, dtype=t.dtype) for t in real.k]
        scratch.store.v = [torch.empty(t.shape, dtype=t.dtype) for t in real.v]
        scratch.store.num_blocks = real.num_blocks
        return scratch

    def _compile_kind(self, scratch: Any, kind: str, rounds: list[tuple[int, ...]]) -> None:
        """Run the throwaway requests of one kind through the scratch engine's compiled step."""
        from mlc.commands.serve.requests import GenerationRequest, SeqEvent
        from mlc.kernels.sampling import SamplingParams

        errors: list[str] = []

        def sink(event: SeqEvent) -> None:
            if event.error is not None:
                errors.append(event.error)

        vocab = scratch.vocab_size
        for r, lengths in enumerate(rounds):
            for i, length in enumerate(lengths):
                prompt = [(7 * j + i) % vocab for j in range(length)]
                scratch.submit(GenerationRequest(f"compile-{kind}-{r}-{i}", prompt, SamplingParams(temperature=0),
                                                 max_tokens=WARM_UP_TOKENS, ignore_eos=True), sink)
            scratch.run_until_idle()
            if errors:  # the step isolates faults per request: a failed compile shows up as failed requests
                raise RuntimeError(errors[0].removeprefix("internal error while running the model: "))
