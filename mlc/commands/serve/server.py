"""`mlc serve` as a function: size the KV cache, load the model, run uvicorn, drain on SIGTERM, record the run."""

from __future__ import annotations

import os
import re
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlc import console
from mlc.errors import InputError


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


def parse_memory(text: str, available: int) -> int:
    """Bytes from '2GiB', '512MB', '1e9' or a fraction of available memory such as '0.1'."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    try:
        value = float(m.group(1)) if m and unit in UNITS else None
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise InputError(f"--kv-cache-memory {text!r} is not a size", "give bytes with a unit (2GiB, 512MB) or a fraction of free RAM (0.1)")
    if value <= 1 and not unit:
        return int(value * available)
    return int(value * UNITS[unit])


def load_engine(cfg: ServeConfig, metrics: Any, path: Path, budget: int) -> tuple[Any, Any, Any]:
    """(engine, tokenizer, grammar factory) for the model at path, with a KV pool sized by the config."""
    import torch

    from mlc.commands.serve.engine import Engine, EngineConfig
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
    model = load_model(path, dtype=dtype_name)
    fuse_projections(model)  # 4 matmuls per layer instead of 7: each small matmul has a fixed cost at batch 1
    tokenizer = load_tokenizer(path)
    mc = model.config
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    per_block = PagedKVStore.bytes_per_block(mc.num_hidden_layers, cfg.block_size, mc.num_key_value_heads, mc.head_dim, dtype)
    num_blocks = budget // per_block
    capacity = num_blocks * cfg.block_size
    max_len = cfg.max_model_len or min(mc.max_position_embeddings, capacity)
    if max_len > mc.max_position_embeddings:
        raise InputError(f"--max-model-len {max_len} exceeds the model's {mc.max_position_embeddings} positions", "lower --max-model-len")
    if num_blocks < 2:
        raise InputError(f"a KV cache of {budget / 2**20:.1f} MiB holds {num_blocks} block(s) of {cfg.block_size} tokens", "raise --kv-cache-memory")
    if capacity < max_len:
        raise InputError(
            f"a KV cache of {budget / 2**20:.0f} MiB holds {capacity} tokens, fewer than --max-model-len {max_len}",
            "raise --kv-cache-memory or lower --max-model-len",
        )
    config = EngineConfig(num_blocks, cfg.block_size, cfg.max_batched_tokens, cfg.max_running, max_len, cfg.enable_prefix_caching,
                          cfg.compile)
    grammars = GrammarFactory(tokenizer.backend.to_str(), mc.vocab_size, tokenizer.eos_token_ids)
    engine = Engine(model, tokenizer, config, metrics, grammars)
    return engine, tokenizer, grammars


def serve(cfg: ServeConfig) -> dict[str, Any]:
    """Run the server until SIGTERM or Ctrl-C; returns the final metrics summary."""
    import uvicorn

    from mlc.commands.serve.api import ServerState, build_app
    from mlc.commands.serve.metrics import ServeMetrics
    from mlc.models.load import resolve_model_path
    from mlc.runs import open_run

    budget = parse_memory(cfg.kv_cache_memory, available_memory())  # a bad size fails before anything starts
    record = {k: v for k, v in asdict(cfg).items() if k != "api_key"} | {"api_key": "set" if cfg.api_key else None}
    with open_run("serve", record, handle_sigterm=False) as run:
        path = run.add_input(cfg.model, role="model")
        is_ref = str(cfg.model).startswith(("run:", "latest:"))
        name = cfg.served_model_name or (str(cfg.model) if is_ref else Path(cfg.model).resolve().name)
        metrics = ServeMetrics(name)
        state = ServerState(name, cfg.api_key, cfg.max_queue, metrics=metrics)

        def load() -> None:
            """Load the model, then run the engine loop in this same thread until the server stops."""
            try:
                engine, tokenizer, grammars = load_engine(cfg, metrics, path, budget)
            except Exception as e:  # stop the server (there is nothing to serve); serve() re-raises it
                state.load_error = e
                server.should_exit = True
                return
            if cfg.compile:  # /health answers 503 (loading) until the decode step is compiled
                console.info("compiling the decode step (torch.compile; minutes on a small CPU, less once cached)")
                engine.warm_up()
            _register_gauges(metrics, engine)
            state.tokenizer, state.grammars, state.max_model_len = tokenizer, grammars, engine.config.max_model_len
            state.engine = engine
            c = engine.config
            run.log(f"serving {path}: {c.num_blocks} KV blocks of {c.block_size} tokens, max model length {c.max_model_len}")
            console.info(
                f"serving {name} on http://{cfg.host}:{cfg.port}/v1 ({c.num_blocks} KV blocks x {c.block_size} tokens, "
                f"max length {c.max_model_len}, {engine.dtype})"
            )
            engine.run()  # this thread loaded the weights, so it alone runs torch's OpenMP work (see Engine.run)

        server = DrainingServer(
            uvicorn.Config(build_app(state), host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=int(cfg.grace_period)),
            state,
        )
        engine_thread = threading.Thread(target=load, name="mlc-serve-engine", daemon=True)
        engine_thread.start()
        server.run()
        if state.engine is not None:
            state.engine.stop()
        engine_thread.join()
        summary = metrics.summary()
        run.log_metrics(summary)
        run.set_summary(**summary)
        if state.load_error is not None:
            raise state.load_error
        if not server.started:
            raise InputError(f"could not listen on {cfg.host}:{cfg.port}", "is the port in use? choose another with --port")
        return summary


def _register_gauges(metrics: Any, engine: Any) -> None:
    pool = engine.pool
    metrics.gauge("mlc:num_requests_running", "Sequences in the running batch.", lambda: engine.num_running)
    metrics.gauge("mlc:num_requests_waiting", "Sequences waiting to be scheduled.", lambda: engine.num_waiting)
    metrics.gauge("mlc:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", lambda: pool.usage)
    metrics.gauge("mlc:kv_cache_free_blocks", "KV-cache blocks free (including cached prefixes).", lambda: pool.num_free)
    metrics.gauge("mlc:kv_cache_total_blocks", "KV-cache blocks in the pool.", lambda: pool.num_blocks)
    metrics.counter("mlc:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", lambda: pool.prefix_queries)
    metrics.counter("mlc:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", lambda: pool.prefix_hits)
    metrics.counter("mlc:num_preemptions_total", "Sequences preempted (recomputed later).", lambda: engine.scheduler.num_preemptions)


def DrainingServer(config: Any, state: Any) -> Any:  # noqa: N802 - an instance of a class that needs uvicorn
    """A uvicorn.Server whose SIGTERM/SIGINT first marks the server draining (new requests get 503).

    uvicorn then stops accepting connections, waits up to the grace period for in-flight requests
    and cancels the rest (their handlers abort their engine requests). The signal is not re-raised
    afterwards, so the process records its run and exits 0.
    """
    import uvicorn

    class Draining(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    return Draining(config)
