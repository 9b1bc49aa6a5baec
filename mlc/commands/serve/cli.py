"""Serve a model over an OpenAI-compatible HTTP API (continuous batching, paged KV cache)."""

from __future__ import annotations

import typer

from mlc.cliutil import new_app

app = new_app("Serve a model over an OpenAI-compatible HTTP API (continuous batching, paged KV cache).")


@app.command()
def serve(
    model: str = typer.Argument(..., help="Model directory or run reference (run:<id>, latest:quantize)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, help="TCP port."),
    served_model_name: str = typer.Option(None, help="The model id clients send (default: the directory name)."),
    dtype: str = typer.Option("auto", help="auto (as stored), float32 or bfloat16."),
    kv_cache_memory: str = typer.Option("0.1", help="KV-cache size: bytes with a unit (2GiB) or a fraction of available RAM (0.1)."),
    block_size: int = typer.Option(16, min=1, help="Tokens per KV-cache block."),
    max_batched_tokens: int = typer.Option(512, min=1, help="Token budget of one engine step (decodes + prefill chunks)."),
    max_running: int = typer.Option(128, min=1, help="Most sequences in the running batch."),
    max_model_len: int = typer.Option(None, min=1, help="Longest prompt + output (default: the model's, if the KV cache holds it)."),
    max_queue: int = typer.Option(256, min=1, help="Waiting requests beyond which new ones get 429."),
    api_key: str = typer.Option(None, envvar="MLC_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching", help="Reuse KV blocks of shared prompt prefixes."),
    grace_period: float = typer.Option(30.0, min=0, help="Seconds SIGTERM waits for in-flight requests before aborting them."),
    threads: int = typer.Option(None, min=1, help="Torch CPU threads (default: all cores)."),
    compile: bool = typer.Option(
        False, "--compile/--no-compile",
        help="torch.compile the decode steps: a slower start (minutes on a small CPU, compiled before serving), faster tokens.",
    ),
) -> None:
    """Serve MODEL at http://HOST:PORT/v1 until SIGTERM or Ctrl-C."""
    # OMP_WAIT_POLICY is left to the user: PASSIVE makes every matmul wake sleeping workers (a decode
    # step took 67 ms instead of 38 ms here). The engine runs torch in one thread only (see Engine.run).
    from mlc.commands.serve.server import ServeConfig, serve as run_server

    run_server(
        ServeConfig(
            model, host, port, served_model_name, dtype, kv_cache_memory, block_size, max_batched_tokens, max_running,
            max_model_len, max_queue, api_key, prefix_caching, grace_period, threads, compile,
        )
    )
