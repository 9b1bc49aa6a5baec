"""Run the demo's stages as real `mlc` processes and report what each made."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc import console, options
from mlc.commands.demo.stages import Stage, lifecycle
from mlc.errors import MlcError
from mlc.runs import index, open_run, read_run
from mlc.servers import wait_healthy

# Summary keys worth showing per stage, in order of preference (each command records its own).
HIGHLIGHTS = (
    "world_size", "final_loss", "eval_ppl", "median_tokens_per_s", "method", "perplexity", "perplexity_before",
    "perplexity_after", "bits_per_param", "layout", "experts", "top_k", "mean_ttft_s", "generation_tokens",
)


@dataclass
class StageResult:
    name: str
    title: str
    seconds: float
    run_id: str | None
    artifact: str | None
    figures: dict[str, Any]


def run_demo(workdir: Path | None, base_steps: int, chat_steps: int, moe_steps: int, serve: bool, json_output: bool) -> None:
    root = options.get().runs_dir.absolute()
    config = {"base_steps": base_steps, "chat_steps": chat_steps, "moe_steps": moe_steps, "serve": serve}
    started = time.perf_counter()
    with open_run("demo", config, runs_root=root) as run:
        work = Path(workdir).absolute() if workdir else run.path / "work"
        work.mkdir(parents=True, exist_ok=True)
        refs: dict[str, str] = {}
        results: list[StageResult] = []
        for stage in lifecycle(work, base_steps, chat_steps, moe_steps):
            result = run_stage(stage, work, root, refs)
            results.append(result)
            if result.run_id:
                refs[stage.name] = f"run:{result.run_id}"
            console.info(f"[green]done[/green] {stage.name:<10} {result.seconds:6.1f}s  {describe(result)}")
        if serve:
            for result in serve_stage(work / "merged-int8", work, root):
                results.append(result)
                console.info(f"[green]done[/green] {result.name:<10} {result.seconds:6.1f}s  {describe(result)}")
        total = time.perf_counter() - started
        summary = {"seconds": round(total, 1), "work": str(work), "stages": [r.__dict__ for r in results]}
        run.set_summary(**summary)
        quantize_run = next((r.run_id for r in results if r.name == "quantize"), None)
    if options.want_json(json_output):
        console.print_json({"run": run.id, **summary})
        return
    print_report(results, total, work, root, quantize_run)


def run_ids(root: Path) -> set[str]:
    return {p.name for p in index.run_dirs(root)}


def run_stage(stage: Stage, work: Path, root: Path, refs: dict[str, str]) -> StageResult:
    for name, make in stage.files.items():
        (work / name).write_text(make(refs))
    argv = [refs[a[1:]] if a.startswith("@") else a for a in stage.argv]
    log = work / f"{stage.name}.log"
    before = run_ids(root)
    start = time.perf_counter()
    with console.err.status(f"[bold]{stage.name}[/bold]: {stage.title}  (mlc {' '.join(argv[:2])} ...)"), open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "mlc", "--runs-dir", str(root), *argv], stdout=f, stderr=subprocess.STDOUT, env=stage_env()
        )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise MlcError(f"demo stage {stage.name} (`mlc {' '.join(argv)}`) failed with exit code {proc.returncode}: {last[0].strip()}", f"its full output is in {log}")
    new = sorted(run_ids(root) - before)
    run_id = new[-1] if new else None
    figures, artifact = {}, None
    if run_id:
        data = read_run(root / run_id).data
        figures = pick_figures(data.get("summary", {}))
        artifact = next((a["path"] for a in data.get("artifacts", {}).values()), None)
    return StageResult(stage.name, stage.title, seconds, run_id, artifact, figures)


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def pick_figures(summary: dict[str, Any]) -> dict[str, Any]:
    picked = {}
    for key in HIGHLIGHTS:
        value = summary.get(key)
        if isinstance(value, float):
            picked[key] = round(value, 3)
        elif isinstance(value, (int, str)) and not isinstance(value, bool):
            picked[key] = value
    return picked


def one_line(text: str, width: int) -> str:
    """The reply on one line, shortened: the tiny model babbles, the point is that it answered."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_stage(model_dir: Path, work: Path, root: Path) -> list[StageResult]:
    """Start `mlc serve`, ask one chat question through the openai client, measure it with `mlc bench serve`, stop it."""
    from openai import OpenAI

    port = free_port()
    log = work / "serve.log"
    before = run_ids(root)
    start = time.perf_counter()
    with console.err.status("[bold]serve[/bold]: OpenAI-compatible server on the quantised model"), open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlc", "--runs-dir", str(root), "serve", str(model_dir), "--port", str(port),
             "--served-model-name", "mlc-demo", "--kv-cache-memory", "64MiB"],
            stdout=f, stderr=subprocess.STDOUT, env=stage_env(),
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=180, log=log, what="mlc serve")
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
            reply = client.chat.completions.create(
                model="mlc-demo", messages=[{"role": "user", "content": "What do bees make?"}], max_tokens=32,
                temperature=0.7, seed=0,  # sampled, not greedy: a model trained for seconds repeats one token greedily
            )
            bench = bench_stage(port, model_dir, work, root)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    seconds = time.perf_counter() - start
    new = sorted(r for r in run_ids(root) - before if "-serve-" in r)  # the bench stage's run started meanwhile too
    answer = reply.choices[0].message.content or ""
    run_id = new[-1] if new else None
    figures = pick_figures(read_run(root / run_id).data.get("summary", {})) if run_id else {}
    figures["answer"] = one_line(answer, 60)
    return [StageResult("serve", "serve the int8 model; ask 'What do bees make?' through the openai client", seconds - bench.seconds, run_id, None, figures), bench]


def bench_stage(port: int, model_dir: Path, work: Path, root: Path) -> StageResult:
    """`mlc bench serve` against the running server: 8 chat prompts of the bundled corpus, 4 at a time."""
    import json

    argv = ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model-ref", str(model_dir), "--endpoint", "chat",
            "--dataset", "chat", "--output-len", "16", "--num-prompts", "8", "--max-concurrency", "4", "--save-detailed", "--json"]
    log = work / "bench.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "mlc", "--runs-dir", str(root), *argv], stdout=subprocess.PIPE, stderr=f, text=True, env=stage_env())
    if proc.returncode != 0:
        raise MlcError(f"demo stage bench (`mlc {' '.join(argv)}`) failed with exit code {proc.returncode}", f"its output is in {log}")
    r = json.loads(proc.stdout)
    figures = {"ttft_ms": round(r["median_ttft_ms"], 1), "tpot_ms": round(r["median_tpot_ms"], 1), "output_tok_s": round(r["output_throughput"], 1)}
    return StageResult("bench", "mlc bench serve: 8 chat prompts, 4 at a time", time.perf_counter() - start, r["run"], None, figures)


def describe(result: StageResult) -> str:
    figures = "  ".join(f"{k}={v}" for k, v in result.figures.items() if v is not None)
    run = f"run {result.run_id}" if result.run_id else ""
    return f"{run}  {figures}".strip()


def print_report(results: list[StageResult], total: float, work: Path, root: Path, quantize_run: str | None) -> None:
    from rich.table import Table

    from mlc.runs.lineage import as_rich_tree, lineage

    table = Table("stage", "s", "run", "figures", title=f"mlc demo: {len(results)} stages in {total:.0f}s", title_justify="left")
    for r in results:
        figures = "  ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}" for k, v in r.figures.items() if v is not None)
        table.add_row(r.name, f"{r.seconds:.0f}", r.run_id.rsplit("-", 1)[-1] if r.run_id else "", figures)
    console.out.print(table)
    console.out.print("\nWhat it made:")
    for r in results:
        if r.artifact:
            console.out.print(f"  {r.name:<10} {r.artifact}")
    if quantize_run:
        console.out.print("\nWhere the quantised model came from (`mlc runs lineage`):")
        console.print_whole(as_rich_tree(lineage(root, f"run:{quantize_run}")))
    console.out.print(f"\nConfigs and logs: {work}\nRuns: {root}  (`mlc runs ls`, `mlc runs show <id>`)")
    console.out.print(f"See them in a browser: mlc --runs-dir {shlex.quote(str(root))} runs ui", markup=False, highlight=False)
