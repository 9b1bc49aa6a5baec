"""Serve a model over an OpenAI-compatible HTTP API (continuous batching, paged KV cache)."""

from __future__ import annotations

from typing import List, Optional

import typer

from mlc.cliutil import new_app

app = new_app("Serve a model over an OpenAI-compatible HTTP API (continuous batching, paged KV cache).")


@app.command()
def serve(
    ctx: typer.Context,
    models: List[str] = typer.Argument(
        ..., metavar="MODEL...", help="Model directory, run reference (run:<id>, latest:quantize) or Hub id; several: one server "
        "routes each request by its model (the first loads at start, the others on their first request).",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, help="TCP port."),
    served_model_name: Optional[List[str]] = typer.Option(
        None, help="The model id clients send (default: the directory name); with several models, once per model, in their order.",
    ),
    dtype: str = typer.Option("auto", help="auto (as stored), float32 or bfloat16."),
    kv_cache_memory: str = typer.Option("0.1", help="KV-cache size: bytes with a unit (2GiB) or a fraction of available RAM (0.1)."),
    block_size: int = typer.Option(16, min=1, help="Tokens per KV-cache block."),
    max_batched_tokens: int = typer.Option(512, min=1, help="Token budget of one engine step (decodes + prefill chunks)."),
    max_running: int = typer.Option(128, min=1, help="Most sequences in the running batch."),
    max_model_len: int = typer.Option(None, min=1, help="Longest prompt + output (default: the model's, if the KV cache holds it)."),
    max_queue: int = typer.Option(256, min=1, help="Waiting sequences (n per prompt) beyond which new requests get 429."),
    api_key: str = typer.Option(None, envvar="MLC_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching", help="Reuse KV blocks of shared prompt prefixes."),
    grace_period: float = typer.Option(
        30.0, min=0, help="On SIGTERM, seconds in-flight requests may run on (new ones get 503) before the rest are aborted."
    ),
    max_memory: str = typer.Option(
        None, help="Bytes (8GiB) or a fraction of free RAM for the weights plus KV caches of the models in memory at once; with "
        "several models the least recently used idle one is unloaded to make room; with --expert-offload, what the other weights "
        "and the KV cache leave of it holds the cached experts (default: no limit).",
    ),
    expert_offload: bool = typer.Option(
        False, "--expert-offload", help="MoE models: keep the routed experts on disk and only a least-recently-used cache of them in "
        "memory (sized by --max-memory), read ahead by the next layer's router. Same output as holding every expert.",
    ),
    expert_prefetch: bool = typer.Option(
        True, "--expert-prefetch/--no-expert-prefetch", help="With --expert-offload: read the experts the next layer's router "
        "predicts ahead, in a background thread (pays when reads wait on a disk while cores are free).",
    ),
    threads: int = typer.Option(None, min=1, help="Torch CPU threads (default: all cores)."),
    compile: bool = typer.Option(
        False, "--compile/--no-compile",
        help="torch.compile the decode steps in the background (served eagerly until ready; cached in ~/.cache/mlc/compile): faster tokens.",
    ),
    engine: str = typer.Option("mlc", help="mlc, or vllm: hand MODEL to vLLM's OpenAI server (when installed; see serve/README.md)."),
    lora: Optional[List[str]] = typer.Option(
        None, help="NAME=PATH: a LoRA adapter (PEFT directory or run:<id>) served unfolded as model NAME (repeatable; either engine)."
    ),
    allow_runtime_lora: bool = typer.Option(
        False, "--allow-runtime-lora", help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (reads paths on this host)."
    ),
    num_speculative_tokens: int = typer.Option(
        0, min=0, help="Speculative decoding: up to N draft tokens per step, from --draft or else by n-gram prompt lookup (0: off). "
        "Same output distribution; greedy output identical; n-gram lookup pays when replies copy from the prompt.",
    ),
    draft: str = typer.Option(
        None, help="A draft model (directory, run:<id>, Hub id) of MODEL's vocabulary that proposes the --num-speculative-tokens "
        "tokens; MODEL verifies them by rejection sampling (same output distribution; greedy output identical).",
    ),
    kv_policy: str = typer.Option(
        "full", help="KV eviction for long contexts: full (keep every position), h2o (heavy hitters + recent window: a sequence's "
        "KV stays at --kv-budget) or scope (the prompt kept whole, generated tokens held to --kv-budget). See serve/README.md.",
    ),
    kv_budget: int = typer.Option(None, help="With --kv-policy h2o or scope: KV positions each sequence keeps per layer (scope: past its prompt)."),
    vllm_arg: Optional[List[str]] = typer.Option(None, help="--engine vllm: one argument passed to `vllm serve` as is (repeatable)."),
    replicas: int = typer.Option(None, min=1, help="Serve N engine replicas on Ray Serve behind this endpoint (needs the ray extra)."),
    min_replicas: int = typer.Option(None, min=1, help="Autoscale the replicas on requests in flight, from this many ..."),
    max_replicas: int = typer.Option(None, min=1, help="... up to this many."),
    target_ongoing_requests: float = typer.Option(16.0, min=0.1, help="Autoscaling: requests in flight per replica to aim for."),
    ray_address: str = typer.Option("local", help="With replicas: the Ray cluster to join (auto, HOST:PORT, ray://...); local starts one."),
) -> None:
    """Serve MODEL (or several: mlc serve A B ...) at http://HOST:PORT/v1 until SIGTERM or Ctrl-C."""
    # OMP_WAIT_POLICY is left to the user: PASSIVE makes every matmul wake sleeping workers (a decode
    # step took 67 ms instead of 38 ms here). The engine runs torch in one thread only (see Engine.run).
    from mlc.errors import MlcUsageError

    names = list(served_model_name or [])
    if len(names) > 1 and len(names) != len(models):
        raise MlcUsageError(f"{len(models)} model(s) and {len(names)} --served-model-name",
                            "give --served-model-name once per model, in the order of the models, or not at all")
    if len(models) > 1 and len(names) == 1:
        raise MlcUsageError(f"{len(models)} models and one --served-model-name: which model it names is ambiguous",
                            "give --served-model-name once per model, in the order of the models, or not at all")
    given = [n for n in ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "ray_address")
             if ctx.get_parameter_source(n).name != "DEFAULT"]
    if given and engine == "vllm":
        raise MlcUsageError("replicas on Ray Serve run mlc's engine", "leave out --engine vllm, or scale vLLM with its own options (--vllm-arg)")
    if min_replicas is None and max_replicas is None and {"target_ongoing_requests"} & set(given):
        raise MlcUsageError("--target-ongoing-requests sets autoscaling", "give --min-replicas and --max-replicas with it")
    if replicas is None and min_replicas is None and max_replicas is None and given:
        raise MlcUsageError("--ray-address places replicas", "give --replicas N (or --min-replicas/--max-replicas) with it")
    if engine == "vllm" and allow_runtime_lora:
        raise MlcUsageError("--allow-runtime-lora is for mlc's engine", "with --engine vllm, set VLLM_ALLOW_RUNTIME_LORA_UPDATING=True instead")
    if engine == "vllm" and num_speculative_tokens:
        raise MlcUsageError("--num-speculative-tokens is for mlc's engine",
                            """with --engine vllm, pass --vllm-arg=--speculative-config --vllm-arg '{"method": "ngram", "num_speculative_tokens": N}'""")
    if draft is not None and engine == "vllm":
        raise MlcUsageError("--draft is for mlc's engine", """with --engine vllm, pass --vllm-arg=--speculative-config --vllm-arg '{"model": "DRAFT", "num_speculative_tokens": N}'""")
    if draft is not None and not num_speculative_tokens:
        raise MlcUsageError("--draft needs --num-speculative-tokens N (the tokens it proposes per step)", "add e.g. --num-speculative-tokens 4")
    if draft is not None and given:
        raise MlcUsageError("--draft is not served by replicas yet", "serve it from one server (leave out --replicas)")
    if given and (lora or allow_runtime_lora):
        raise MlcUsageError("LoRA adapters are not served by replicas yet", "serve them from one server (leave out --replicas), or fold them (mlc merge lora)")
    if len(models) > 1:
        if engine == "vllm":
            raise MlcUsageError("--engine vllm serves one model", "run one `mlc serve MODEL --engine vllm` per model, or leave out --engine")
        if given:
            raise MlcUsageError("replicas serve one model", "serve several models from one server (leave out --replicas/--min-replicas), "
                                "or one deployment per model")
        if lora or allow_runtime_lora:
            raise MlcUsageError("--lora with several models: which model an adapter attaches to would be ambiguous",
                                "serve adapters from a server with one base model")
        if draft is not None:
            raise MlcUsageError("--draft with several models: which model it drafts for would be ambiguous", "serve a draft with one model")
    if kv_policy != "full" or kv_budget is not None:
        from mlc.commands.serve.kv_policy import check_kv_policy

        check_kv_policy(kv_policy, kv_budget)
        if engine == "vllm":
            raise MlcUsageError("--kv-policy is for mlc's engine", "leave it out with --engine vllm")
        if num_speculative_tokens or draft is not None:
            raise MlcUsageError(f"--kv-policy {kv_policy} does not cover speculative decoding", "leave out --num-speculative-tokens/--draft, or --kv-policy")
        if compile:
            raise MlcUsageError(f"--kv-policy {kv_policy} does not run under --compile yet", "leave out --compile, or --kv-policy")
        if ctx.get_parameter_source("prefix_caching").name != "DEFAULT" and prefix_caching:
            raise MlcUsageError(f"--kv-policy {kv_policy} rewrites KV blocks in place, so they cannot be shared by --prefix-caching",
                                "leave out --prefix-caching (eviction turns it off)")
        prefix_caching = False
    if draft is not None and max_memory is not None:
        raise MlcUsageError("--max-memory does not count a draft model's weights yet", "leave out --max-memory with --draft")
    if max_memory is not None and (engine == "vllm" or given):
        raise MlcUsageError("--max-memory is for mlc's engine in one server", "leave it out with --engine vllm or replicas")
    if not expert_prefetch and not expert_offload:
        raise MlcUsageError("--no-expert-prefetch is for --expert-offload", "add --expert-offload, or leave it out")
    if expert_offload:
        if engine == "vllm" or given or len(models) > 1:
            raise MlcUsageError("--expert-offload is for mlc's engine serving one model", "leave out --engine vllm, --replicas and further models")
        if max_memory is None:
            raise MlcUsageError("--expert-offload needs --max-memory SIZE: the other weights, the KV cache and the cached experts together",
                                "add e.g. --max-memory 1GiB")
        if compile or lora or allow_runtime_lora:
            raise MlcUsageError("--expert-offload does not cover --compile or LoRA adapters yet", "leave out --compile, --lora and --allow-runtime-lora")
    if engine == "vllm":
        from mlc.commands.serve.vllm import options_from_cli, serve_vllm

        params = {**ctx.params, "served_model_name": names[0] if names else None}
        serve_vllm(models[0], options_from_cli(params, lambda name: ctx.get_parameter_source(name).name != "DEFAULT"))
        return
    if engine != "mlc" or vllm_arg:
        if engine != "mlc":
            raise MlcUsageError(f"--engine {engine!r} is not mlc or vllm", "leave it out for mlc's engine, or give --engine vllm")
        raise MlcUsageError("--vllm-arg needs --engine vllm", "leave it out with mlc's engine")
    from mlc.commands.serve.replicas import check_plan
    from mlc.commands.serve.server import ServeConfig
    from mlc.commands.serve.server import serve as run_server

    cfg = ServeConfig(
        models[0], host, port, names[0] if names else None, dtype, kv_cache_memory, block_size, max_batched_tokens, max_running,
        max_model_len, max_queue, api_key, prefix_caching, grace_period, threads, compile, list(lora or []), allow_runtime_lora,
        num_speculative_tokens=num_speculative_tokens, more_models=models[1:], more_served_names=names[1:], max_memory=max_memory,
        draft=draft, expert_offload=expert_offload, expert_prefetch=expert_prefetch, kv_policy=kv_policy, kv_budget=kv_budget,
    )
    if (span := check_plan(replicas, min_replicas, max_replicas)) is not None:
        from mlc.commands.serve.replicas import ReplicaPlan, serve_replicas

        serve_replicas(cfg, ReplicaPlan(*span, ray_address, target_ongoing_requests, float(threads or 1)))
        return
    if cfg.more_models:
        from mlc.commands.serve.modelset import serve_models
        from mlc.commands.serve.server import available_memory, parse_memory

        serve_models(cfg, parse_memory(cfg.kv_cache_memory, available_memory()))
        return
    run_server(cfg)
