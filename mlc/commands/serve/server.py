"""`mlc serve` as a function: size the KV cache, load the model, run uvicorn, drain on SIGTERM, record the run."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlc import console
from mlc.errors import InputError, MlcError


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    dtype: str = "auto"
    kv_cache_memory: str = "0.1"
    block_size: int = 16
    max_batched_tokens: int = 512
    max_running: int = 128
    max_model_len: int | None = None
    max_queue: int = 256
    api_key: str | None = None
    enable_prefix_caching: bool = True
    grace_period: float = 30.0
    threads: int | None = None
    compile: bool = False
    lora: list[str] = field(default_factory=list)  # NAME=PATH (PATH may be a run reference)
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    num_speculative_tokens: int = 0  # n-gram prompt-lookup drafts per decode step (0: off)
    more_models: list[str] = field(default_factory=list)  # further models (mlc serve A B ...), each loaded on its first request
    more_served_names: list[str] = field(default_factory=list)  # their --served-model-name, in order (empty: the default names)
    max_memory: str | None = None  # weights + KV caches of the models in memory at once (None: no limit)
    draft: str | None = None  # a draft model (path or reference) of the same vocabulary, for speculative decoding
    expert_offload: bool = False  # MoE experts stay on disk behind a cache sized by what max_memory leaves (expert_cache.py)
    expert_prefetch: bool = True  # with expert_offload: read the experts the next layer's router predicts ahead
    kv_policy: str = "full"  # KV eviction (kv_policy.py): full, h2o or scope
    kv_budget: int | None = None  # with h2o or scope: KV positions a sequence keeps per layer


UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "kib": 1024, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def available_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or free pages where /proc is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_memory(text: str, available: int, flag: str = "--kv-cache-memory") -> int:
    """Bytes from '2GiB', '512MB', '1e9' or a fraction of available memory such as '0.1'."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    try:
        value = float(m.group(1)) if m and unit in UNITS else None
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise InputError(f"{flag} {text!r} is not a size", "give bytes with a unit (2GiB, 512MB) or a fraction of free RAM (0.1)")
    if value <= 1 and not unit:
        return int(value * available)
    return int(value * UNITS[unit])


def parse_loras(specs: list[str], model_name: str) -> list[tuple[str, str]]:
    """[(name, path or reference)] from --lora NAME=PATH options; InputError for a malformed or repeated name."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, eq, ref = spec.partition("=")
        name, ref = name.strip(), ref.strip()
        if not eq or not name or not ref:
            raise InputError(f"--lora {spec!r} is not NAME=PATH", "e.g. --lora sql=run:3fa2c1 (the name clients send as model)")
        if name == model_name or name in (n for n, _ in out):
            raise InputError(f"--lora name {name!r} is used twice (or is the base model's name)", "give each adapter its own name")
        out.append((name, ref))
    return out


def load_engine(cfg: ServeConfig, name: str, path: Path, budget: int, loras: list[tuple[str, Path]] | None = None,
                metrics: Any = None, draft_path: Path | None = None) -> tuple[Any, Any, Any]:
    """(engine, tokenizer, grammar factory) for the model at path, with a KV pool sized by the config, the LoRA adapters and
    the draft model given (the KV budget covers the draft's cache too; metrics: its ServeMetrics, when the server shares
    one registry between several models)."""
    import torch

    from mlc.commands.serve.engine import Engine, EngineConfig
    from mlc.commands.serve.metrics import ServeMetrics
    from mlc.commands.serve.structured import GrammarFactory
    from mlc.io.hfdir import read_config
    from mlc.kernels.paged_attention import PagedKVStore
    from mlc.models import load_model
    from mlc.models.tokenizer import load_tokenizer
    from mlc.models.transformer import fuse_projections

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype_name = None if cfg.dtype == "auto" else cfg.dtype
    if dtype_name is None and "quantization_config" in read_config(path):
        dtype_name = "bfloat16"  # the int8/int4 CPU kernels are fast with bf16 activations, 10-40x slower with fp32
    if cfg.expert_offload:
        from mlc.commands.serve.expert_cache import expert_capacity, load_offloaded

        capacity = expert_capacity(path, cfg.dtype, budget, parse_memory(str(cfg.max_memory), available_memory(), "--max-memory"))
        model = load_offloaded(path, dtype_name, capacity, fuse=True, prefetch=cfg.expert_prefetch)
    else:
        model = load_model(path, dtype=dtype_name)
    fuse_projections(model)  # 4 matmuls per layer instead of 7: each small matmul has a fixed cost at batch 1
    lora = None
    if loras or cfg.allow_runtime_lora:
        from mlc.commands.serve.lora import LoraSet

        lora = LoraSet(model)
        for lora_name, lora_path in loras or []:
            lora.add(lora.read(lora_name, lora_path))
    tokenizer = load_tokenizer(path)
    mc = model.config
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    per_block = PagedKVStore.bytes_per_block(mc.num_hidden_layers, cfg.block_size, mc.num_key_value_heads, mc.head_dim, dtype)
    draft = None
    if draft_path is not None:
        from mlc.commands.serve.draft import kv_bytes_per_block, load_draft

        draft = load_draft(draft_path, None if cfg.dtype == "auto" else cfg.dtype)
        per_block += kv_bytes_per_block(draft, cfg.block_size)
    num_blocks = budget // per_block
    capacity = num_blocks * cfg.block_size
    h2o = cfg.kv_policy == "h2o"  # a sequence holds its budget plus one step's tokens, whatever its length
    max_len = cfg.max_model_len or (mc.max_position_embeddings if h2o else min(mc.max_position_embeddings, capacity))
    if max_len > mc.max_position_embeddings:
        raise InputError(f"--max-model-len {max_len} exceeds the model's {mc.max_position_embeddings} positions", "lower --max-model-len")
    if num_blocks < 2:
        raise InputError(f"a KV cache of {budget / 2**20:.1f} MiB holds {num_blocks} block(s) of {cfg.block_size} tokens", "raise --kv-cache-memory")
    held = min(max_len, cfg.kv_budget + cfg.max_batched_tokens + cfg.block_size) if h2o else max_len
    if capacity < held:
        raise InputError(
            f"a KV cache of {budget / 2**20:.0f} MiB holds {capacity} tokens, fewer than " + (
                f"--kv-budget plus a step's --max-batched-tokens ({held})" if held < max_len else f"--max-model-len {max_len}"),
            "raise --kv-cache-memory" + (", lower --kv-budget or --max-batched-tokens" if held < max_len else " or lower --max-model-len"),
        )
    if cfg.kv_policy != "full":
        from mlc.commands.serve.kv_policy import engine_conflict

        if (conflict := engine_conflict(mc, cfg.enable_prefix_caching, cfg.num_speculative_tokens, cfg.compile)) is not None:
            raise InputError(conflict, "serve it with --kv-policy full")
    if draft is not None:
        from mlc.commands.serve.draft import check_draft

        check_draft(draft, model, max_len)
    config = EngineConfig(num_blocks, cfg.block_size, cfg.max_batched_tokens, cfg.max_running, max_len, cfg.enable_prefix_caching,
                          cfg.compile, cfg.num_speculative_tokens, kv_policy=cfg.kv_policy, kv_budget=cfg.kv_budget or 0)
    grammars = GrammarFactory(tokenizer.backend.to_str(), mc.vocab_size, tokenizer.eos_token_ids)
    engine = Engine(model, tokenizer, config, metrics or ServeMetrics(name, max_len), grammars, lora, draft)
    if cfg.expert_offload:
        from mlc.commands.serve.expert_cache import register_metrics

        register_metrics(model.expert_cache, engine.metrics.registry, engine.metrics.labels)
    return engine, tokenizer, grammars


def serve(cfg: ServeConfig) -> dict[str, Any]:
    """Run the server until SIGTERM or Ctrl-C; returns the final metrics summary."""
    import uvicorn

    from mlc.commands.serve.api import ServerState, build_app
    from mlc.runs import open_run

    budget = parse_memory(cfg.kv_cache_memory, available_memory())  # a bad size fails before anything starts
    if cfg.compile and (cfg.lora or cfg.allow_runtime_lora):
        raise InputError("--compile does not cover LoRA adapters yet", "serve adapters without --compile, or fold them (`mlc merge lora`)")
    record = {k: v for k, v in asdict(cfg).items() if k != "api_key"} | {"api_key": "set" if cfg.api_key else None}
    with open_run("serve", record, handle_sigterm=False) as run:
        path = run.add_input(cfg.model, role="model")
        name = served_name(cfg)
        if cfg.max_memory is not None:
            from mlc.commands.serve.footprint import check_fits, footprint

            max_memory = parse_memory(cfg.max_memory, available_memory(), "--max-memory")
            if cfg.expert_offload:  # the experts need not fit: what the rest leaves of max_memory caches them
                from mlc.commands.serve.expert_cache import expert_capacity

                expert_capacity(path, cfg.dtype, budget, max_memory)
            else:
                check_fits(name, footprint(path, cfg.dtype, budget), max_memory)
        loras = [(n, run.add_input(ref, role=f"lora:{n}")) for n, ref in parse_loras(cfg.lora, name)]
        draft_path = run.add_input(cfg.draft, role="draft") if cfg.draft else None
        if draft_path is not None:
            from mlc.commands.serve.draft import check_same_vocabulary

            check_same_vocabulary(path, draft_path)  # before the server starts: a wrong draft is a one-line error
        state = ServerState(name, cfg.api_key, cfg.max_queue, record_input=run.add_input,
                            allow_runtime_lora=cfg.allow_runtime_lora, runs_root=run.root)

        def load() -> None:
            """Load the model, then run the engine loop in this same thread until the server stops."""
            try:
                engine, tokenizer, grammars = load_engine(cfg, name, path, budget, loras, draft_path=draft_path)
            except Exception as e:  # noqa: BLE001 - stop the server (there is nothing to serve); serve() re-raises it
                state.load_error = e
                server.should_exit = True
                return
            engine.compile_in_background()  # with --compile: served eagerly until each kind of decode step is compiled
            engine.metrics.bind_engine(engine)
            state.tokenizer, state.grammars, state.max_model_len = tokenizer, grammars, engine.config.max_model_len
            state.metrics = engine.metrics
            state.engine = engine
            c = engine.config
            run.log(f"serving {path}: {c.num_blocks} KV blocks of {c.block_size} tokens, max model length {c.max_model_len}")
            console.info(
                f"serving {name} on http://{cfg.host}:{cfg.port}/v1 ({c.num_blocks} KV blocks x {c.block_size} tokens, "
                f"max length {c.max_model_len}, {engine.dtype})"
            )
            engine.run()  # this thread loaded the weights, so it alone runs torch's OpenMP work (see Engine.run)
            if engine.error is not None:  # the loop itself died: nothing will serve again, so stop (a supervisor restarts us)
                state.load_error = MlcError(f"the engine loop failed: {engine.error!r}", "see the log above; restart the server")
                server.should_exit = True

        server = DrainingServer(
            uvicorn.Config(build_app(state), host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5),
            state,
            cfg.grace_period,
        )
        engine_thread = threading.Thread(target=load, name="mlc-serve-engine", daemon=True)
        engine_thread.start()
        server.run()
        if state.engine is not None:
            state.engine.stop()
        engine_thread.join()
        summary = state.metrics.summary() if state.metrics is not None else {}
        if (cache := getattr(getattr(state.engine, "model", None), "expert_cache", None)) is not None:
            from mlc.commands.serve.expert_cache import log_summary

            summary |= log_summary(cache)
        run.log_metrics(summary)
        run.set_summary(**summary)
        if state.load_error is not None:
            raise state.load_error
        if not server.started:
            raise InputError(f"could not listen on {cfg.host}:{cfg.port}", "is the port in use? choose another with --port")
        return summary


def served_name(cfg: ServeConfig) -> str:
    """The model id clients send: --served-model-name, else a run reference or Hub id as given, else the directory's name."""
    return cfg.served_model_name or default_name(cfg.model)


def default_name(model: str) -> str:
    """A model's id without --served-model-name: a run reference or Hub id as given, else the directory's name."""
    is_ref = str(model).startswith(("run:", "latest:"))
    return str(model) if is_ref or _is_hub_id(str(model)) else Path(model).resolve().name


def _is_hub_id(text: str) -> bool:
    """A Hub id (org/name[@revision]) that is not a local path: served under that id, as vLLM does."""
    from mlc.io.hub import is_hub_id

    return is_hub_id(text) and not Path(text).expanduser().exists()


# After the grace period, the aborted streams get this long to send their final chunks before uvicorn stops.
ABORT_FLUSH_S = 5.0


def DrainingServer(config: Any, state: Any, grace_period: float) -> Any:  # noqa: N802 - an instance of a class that needs uvicorn
    """A uvicorn.Server that drains on SIGTERM/SIGINT before it stops.

    The first signal marks the server draining: it keeps listening, and new requests and /health
    get 503 with Retry-After (so a load balancer moves on). Requests in flight run on for up to the
    grace period; those still running then are aborted: streams end with a finish_reason "abort"
    chunk and [DONE], other requests get a 503. Once none is left (or ABORT_FLUSH_S after the abort),
    uvicorn stops as usual. A second signal stops at once. The signal is not re-raised afterwards,
    so the process records its run and exits 0.
    """
    import uvicorn

    class Draining(uvicorn.Server):
        drain_started: float | None = None
        aborted_at: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_started is None and not self.should_exit:
                state.draining = True
                self.drain_started = time.monotonic()
                return
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        async def on_tick(self, counter: int) -> bool:
            if self.drain_started is not None and not self.should_exit:
                now = time.monotonic()
                if not state.jobs:
                    self.should_exit = True
                elif self.aborted_at is None and now - self.drain_started >= grace_period:
                    state.abort_all()
                    self.aborted_at = now
                elif self.aborted_at is not None and now - self.aborted_at >= ABORT_FLUSH_S:
                    self.should_exit = True
            return await super().on_tick(counter)

    return Draining(config)
