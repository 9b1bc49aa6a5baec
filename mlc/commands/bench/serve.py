"""`mlc bench serve` as a function: resolve the target, make the prompts, run the load, record the result.

The run directory (command `bench`) keeps result.json (every metric with the settings and versions),
requests.json with --save-detailed, and the figures with --plot. When the server is `mlc serve` of an
mlc artifact (started with --server, or named with --model-ref), that artifact is the run's `model`
input, so `mlc runs lineage run:<bench id>` leads from the measurement back to the training data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mlc import console
from mlc.commands.bench.client import Target
from mlc.commands.bench.datasets import DatasetOptions, load_samples
from mlc.commands.bench.runner import Load, run_benchmark
from mlc.commands.bench.server import ManagedServer, first_model, normalize_base_url, served_mlc_model
from mlc.errors import MlcUsageError

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass
class ServeBench:
    base_url: str | None = None
    endpoint: str = "completions"
    api_key: str | None = None
    model: str | None = None
    server: str | None = None
    server_timeout: float = 600.0
    model_ref: str | None = None
    tokenizer: str | None = None
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    num_prompts: int = 1000
    load: Load = field(default_factory=Load)
    percentiles: list[float] = field(default_factory=lambda: [99.0])
    slos: dict[str, float] = field(default_factory=dict)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def validate(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise MlcUsageError(f"--endpoint {self.endpoint!r} is not completions or chat", "the OpenAI API's two text endpoints")
        if self.num_prompts < 1:
            raise MlcUsageError("--num-prompts must be at least 1", "send one request or more")
        load = self.load
        if load.max_concurrency is not None and load.max_concurrency < 1:
            raise MlcUsageError("--max-concurrency must be at least 1", "leave it out for no limit")
        if not load.burstiness > 0:
            raise MlcUsageError(f"--burstiness {load.burstiness} must be positive", "1 gives Poisson arrivals; lower is burstier")
        if load.ramp_up is None:
            if load.ramp_start is not None or load.ramp_end is not None:
                raise MlcUsageError("--ramp-up-start-rps/--ramp-up-end-rps need --ramp-up linear|exponential", "or leave them out")
            if not load.request_rate > 0:
                raise MlcUsageError(f"--request-rate {load.request_rate} must be positive", "inf sends every request at once")
        else:
            if load.ramp_up not in ("linear", "exponential"):
                raise MlcUsageError(f"--ramp-up {load.ramp_up!r} is not linear or exponential", "pick one")
            if load.request_rate != float("inf"):
                raise MlcUsageError("--ramp-up sets the rate itself: leave out --request-rate", "give --ramp-up-start-rps and --ramp-up-end-rps")
            if load.ramp_start is None or load.ramp_end is None or not 0 < load.ramp_start <= load.ramp_end:
                raise MlcUsageError("--ramp-up needs 0 < --ramp-up-start-rps <= --ramp-up-end-rps", "e.g. --ramp-up linear --ramp-up-start-rps 1 --ramp-up-end-rps 8")
        if self.base_url is not None:
            normalize_base_url(self.base_url)
        if self.server and self.base_url and "{port}" in self.server:
            raise MlcUsageError("--server with {port} sets the URL itself: leave out --base-url", "or put a fixed port in the command and keep --base-url")
        if self.server and not self.base_url and "{port}" not in self.server:
            raise MlcUsageError("--server needs {port} in the command or a --base-url to reach it", 'e.g. --server "mlc serve MODEL --port {port}"')

    def body_fields(self) -> dict[str, Any]:
        """Fixed fields of every request: sampling settings (only those given), ignore_eos, --extra-body."""
        fields = {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k)) if v is not None}
        if self.ignore_eos or self.dataset.name == "random":  # vLLM ignores EOS for random prompts, so outputs reach their length
            fields["ignore_eos"] = True
        return {**fields, **self.extra_body}

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = "set" if self.api_key else None
        out["dataset"]["path"] = str(self.dataset.path) if self.dataset.path else None
        return out


def _headers(opts: ServeBench) -> dict[str, str]:
    return {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}


class Progress:
    """Completed requests: a rich bar on a terminal, a plain line every 10% on stderr otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self.bar, self.task, self.next_line = total, 0, None, None, 0.1

    def __enter__(self) -> "Progress":
        from mlc import options

        if console.progress_enabled() and self.total:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console.err, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("requests", total=self.total)
        self.quiet = options.get().verbosity < 0 or options.get().json or not self.total
        return self

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif not self.quiet and self.done >= self.next_line * self.total:
            print(f"bench: {self.done}/{self.total} requests done", file=sys.stderr, flush=True)
            while self.next_line * self.total <= self.done:
                self.next_line += 0.1

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def prepare(opts: ServeBench, run: Any, role: str = "model") -> tuple[Any, str | None]:
    """(tokenizer or None, the served mlc model's reference): records that model as the run's input for lineage."""
    from mlc.commands.bench.tokens import load_counter

    served, model_ref = None, opts.model_ref
    if model_ref is None and opts.server:
        import shlex

        with contextlib.suppress(ValueError):
            model_ref = served_mlc_model(shlex.split(opts.server))
    if model_ref:
        served = run.add_input(model_ref, role=role)  # the lineage link: this measurement is of that artifact
    tok_ref = opts.tokenizer or (str(served) if served is not None and (Path(served) / "tokenizer.json").is_file() else None)
    return (load_counter(tok_ref, run.root) if tok_ref else None), model_ref


def measure(opts: ServeBench, base_url: str, tok: Any, managed: ManagedServer | None, model_ref: str | None, run: Any,
            cold_start: bool = True, show_progress: bool = True) -> dict[str, Any]:
    """One benchmark against a running server: the result dict (per-request rows under '_detailed').

    cold_start: the server was just started by bench, so this run's first token completes its cold start.
    """
    samples = load_samples(opts.dataset, opts.num_prompts, tok, chat=opts.endpoint == "chat")
    headers = _headers(opts)
    model = opts.model or first_model(base_url, headers)
    path = "/v1/chat/completions" if opts.endpoint == "chat" else "/v1/completions"
    target = Target(base_url + path, model, opts.endpoint == "chat", headers, opts.body_fields())
    console.info(f"bench: {opts.num_prompts} requests ({opts.dataset.name}) to {target.url}, model {model}")
    with Progress(opts.num_prompts if show_progress else 0) as progress:
        out = run_benchmark(target, samples, opts.load, tok, opts.percentiles, opts.slos, progress,
                            server_cpu=managed.cpu_seconds if managed is not None else lambda: None)
    cold = None
    if managed is not None and cold_start:
        cold = {"healthy_s": managed.healthy_at - managed.started_at, "first_token_s": out.first_token_at - managed.started_at}
    load = opts.load
    from mlc.runs.rundir import versions

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "label": opts.label,
        "backend": "openai-chat" if opts.endpoint == "chat" else "openai",
        "base_url": base_url,
        "endpoint": path,
        "model_id": model,
        "tokenizer_id": str(tok.path) if tok else None,
        "num_prompts": opts.num_prompts,
        "dataset": opts.dataset.name,
        "request_rate": "inf" if load.request_rate == float("inf") else load.request_rate,
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
        "ramp_up_strategy": load.ramp_up,
        "ramp_up_start_rps": load.ramp_start,
        "ramp_up_end_rps": load.ramp_end,
        "goodput_slos": opts.slos or None,
        "server": managed.describe() if managed is not None else None,
        "cold_start": cold,
        "model_ref": model_ref,
        **out.result,
        "settings": opts.settings(),
        "run": run.id,
        "versions": versions(),
        "_detailed": out.detailed,  # taken out by the caller (saved only with --save-detailed)
        "_origin": out.origin,
    }


def run_serve_bench(opts: ServeBench, run: Any) -> dict[str, Any]:
    """Benchmark the server (starting and stopping --server) and record the result in `run`; returns the result dict."""
    opts.validate()
    tok, model_ref = prepare(opts, run)
    load_samples(opts.dataset, 1, tok, chat=opts.endpoint == "chat")  # a bad dataset fails before any server starts
    with _server(opts, run) as (base_url, managed):
        result = measure(opts, base_url, tok, managed, model_ref, run)
    run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.set_summary(**{k: result[k] for k in ("completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms", "mean_tpot_ms", "request_goodput")})
    return result


@contextlib.contextmanager
def _server(opts: ServeBench, run: Any) -> Iterator[tuple[str, ManagedServer | None]]:
    """(base URL, the managed server or None): starts and stops --server, else just checks the URL."""
    if not opts.server:
        yield normalize_base_url(opts.base_url or DEFAULT_URL), None
        return
    managed = ManagedServer.start(opts.server, opts.base_url, run.root, run.path / "server.log")
    run.log(f"started server: {managed.describe()}")
    try:
        seconds = managed.wait_healthy(_headers(opts), opts.server_timeout)
        console.info(f"bench: server healthy after {seconds:.1f}s at {managed.base_url}")
        yield managed.base_url, managed
    finally:
        code = managed.stop()
        run.log(f"server stopped with exit code {code}")


def save_outputs(result: dict[str, Any], run: Any, save_result: Path | None, save_detailed: bool, plot: Path | None) -> None:
    """Record result.json (+ requests.json, figures) as the run's artifact, and copy to --save-result / --plot."""
    from mlc.io.atomic import atomic_write_json

    detailed, origin = result.pop("_detailed"), result.pop("_origin")
    # The rows' times count from the run's start; its time.perf_counter() value lets a log on this machine be aligned.
    saved = {**result, "per_request": detailed, "per_request_origin_perf_counter": origin} if save_detailed else result
    with run.artifact("result", kind="bench-result") as staging:
        (staging / "result.json").write_text(json.dumps(saved, indent=2, default=str) + "\n")
        if plot is not None:
            from mlc.commands.bench.plots import plot_run

            title = f"{result['model_id']}: {result['dataset']}, {result['num_prompts']} requests"
            for p in plot_run(detailed, staging / "plots", title):
                plot.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, plot / p.name)
    if save_result is not None:
        save_result.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(save_result, saved)
