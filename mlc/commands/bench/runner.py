"""The benchmark loop: a first checking request, warm-ups, then every prompt at its arrival time.

As `vllm bench serve` does: requests go out at the times of the arrival process (arrivals.py), at most
--max-concurrency at a time (a request that finds no free slot waits in the client, and its start is
when it is actually sent), and the run's duration spans from the first scheduled gap to the last
response. Before that, one request with the first prompt checks the settings (a bad model name or
field fails here, with the server's message), and --num-warmups copies of it warm the server; neither
counts. The garbage collector's heap is frozen first so collections do not pause the client mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from mlc.commands.bench import metrics
from mlc.commands.bench.arrivals import arrival_times
from mlc.commands.bench.client import Outcome, Target, request_body, send
from mlc.commands.bench.datasets import Sample
from mlc.commands.bench.tokens import TokenCounter
from mlc.errors import MlcError


@dataclass
class Load:
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ramp_up: str | None = None
    ramp_start: float | None = None
    ramp_end: float | None = None
    num_warmups: int = 0
    seed: int = 0
    request_timeout: float = 6 * 3600.0  # vLLM's aiohttp timeout


@dataclass
class RunOutput:
    result: dict[str, Any]
    detailed: list[dict[str, Any]]
    first_check: Outcome
    first_token_at: float  # perf_counter time of the checking request's first token (cold start)
    origin: float  # perf_counter time the run started: the per-request rows' times count from it
    outcomes: list[Outcome] = field(default_factory=list)


def session(load: Load) -> aiohttp.ClientSession:
    # limit=0: the semaphore below, not the connection pool, bounds concurrency (a pool limit would queue
    # requests inside aiohttp, where their wait could not be measured).
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=load.request_timeout, sock_connect=30))


async def _benchmark(target: Target, samples: list[Sample], load: Load, tok: TokenCounter | None, progress: Callable[[int], None],
                     cpu: Callable[[], float | None]) -> tuple[Outcome, float, list[Outcome], float, float, float | None]:
    async with session(load) as http:
        check = await send(http, target, -1, request_body(target, samples[0].prompt, samples[0].output_len))
        first_token_at = check.start + check.ttft
        if not check.success:
            raise MlcError(f"the first request failed: {check.error}", f"check the server, --model and --endpoint ({target.url})")
        if tok is None and (not check.output_tokens or (check.prompt_tokens is None and samples[0].prompt_len is None)):
            raise MlcError(
                "the server sends no token counts (usage) in its stream and no tokenizer was given to count them",
                "give --tokenizer PATH (the served model's directory or tokenizer.json)",
            )
        slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else contextlib.nullcontext()

        async def limited(index: int, sample: Sample) -> Outcome:
            arrived = time.perf_counter()
            async with slots:
                out = await send(http, target, index, request_body(target, sample.prompt, sample.output_len))
            out.queued = out.start - arrived
            if index >= 0:
                progress(1)
            return out

        if load.num_warmups:
            await asyncio.gather(*(limited(-1, samples[0]) for _ in range(load.num_warmups)))
        times = arrival_times(len(samples), load.request_rate, load.burstiness, load.seed, load.ramp_up, load.ramp_start, load.ramp_end)
        tasks = []
        cpu_start = cpu()
        start = time.perf_counter()
        for i, (sample, at) in enumerate(zip(samples, times)):
            wait = start + at - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(limited(i, sample)))
        outcomes = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        cpu_end = cpu()
    server_cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return check, first_token_at, outcomes, start, duration, server_cpu


def count_tokens(outcomes: list[Outcome], samples: list[Sample], tok: TokenCounter | None) -> tuple[list[metrics.Counted], list[Outcome]]:
    """Completed requests with their token counts (usage first, else the tokenizer), and the failed ones."""
    counted, failed = [], []
    for out in outcomes:
        if not out.success:
            failed.append(out)
            continue
        sample = samples[out.index]
        output = out.output_tokens or (tok.count(out.text) if tok else None)
        prompt = out.prompt_tokens if out.prompt_tokens is not None else sample.prompt_len
        if output is None or prompt is None:
            raise MlcError(
                "the server sent no token counts (usage) and no tokenizer was given to count them",
                "give --tokenizer PATH (the served model's directory or tokenizer.json)",
            )
        counted.append(metrics.Counted(out, prompt, output))
    return counted, failed


def run_benchmark(target: Target, samples: list[Sample], load: Load, tok: TokenCounter | None, percentiles: list[float],
                  slos: dict[str, float], progress: Callable[[int], None] = lambda n: None,
                  server_cpu: Callable[[], float | None] = lambda: None) -> RunOutput:
    """Run the whole benchmark and compute its metrics.

    server_cpu: reads the server's CPU seconds (when bench started the server); its use over the measured
    requests (not the check or the warm-ups) is reported as server_cpu_s and output tokens per server CPU-second.
    """
    gc.collect()
    gc.freeze()  # the prompts and everything loaded so far are never collected; pauses stay short
    try:
        check, first_token_at, outcomes, start, duration, cpu_s = asyncio.run(_benchmark(target, samples, load, tok, progress, server_cpu))
    finally:
        gc.unfreeze()
    counted, failed = count_tokens(outcomes, samples, tok)
    result = metrics.compute(counted, len(failed), duration, percentiles, slos, client_queue=load.max_concurrency is not None)
    if cpu_s is not None:  # an mlc addition: the steadier measure of work per token on shared cores
        result["server_cpu_s"] = cpu_s
        result["output_tokens_per_server_cpu_s"] = result["total_output_tokens"] / max(cpu_s, 1e-9)
    result["errors"] = sorted({o.error for o in failed})[:10]
    return RunOutput(result, metrics.per_request(counted, failed, start), check, first_token_at, start, outcomes)
