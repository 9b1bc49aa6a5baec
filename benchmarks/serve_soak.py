"""Soak `mlc serve` with mixed, partly hostile load on SmolLM2-135M and report whether anything degrades.

    .venv/bin/python benchmarks/serve_soak.py [--duration 600] [--clients 8] [--dtype bfloat16] [--threads N] [--out soak.json]

For --duration seconds, --clients threads each send one request after another, drawn at random (seeded):
streamed completions read to the end, streams the client abandons after a few chunks, requests whose client
times out before the answer, chat completions, json_schema chat completions (the output is parsed and checked
against the schema by hand), completions with n = 2..4, and requests from the bad-request corpus of the tests
(tests/serve/bad_requests.json; each must get its expected 4xx). Reported: requests served per kind, 5xx
answers and dropped connections (goal 0; a client that got no answer within 300 s is counted apart), answers that differ from what was expected, the server's RSS one
minute in and at the end of the load (goal: within 2%), KV blocks still in use once idle (goal 0), TTFT p50
and p99 of the streams read to the end, /health afterwards, and that SIGTERM then exits 0 with no traceback
in the log. This is a benchmark, not a test: it runs for minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.client import HTTPConnection, HTTPException
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from served import get, metric_totals  # benchmarks/served.py: the script's directory is on the path

from mlc.paths import cache_dir
from tests.conftest import smollm2_hf_dir  # the real-model fixture's files
from tests.serve import corpus

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "colour": {"enum": ["red", "green", "blue"]}},
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}
KINDS = {"stream": 4, "stream_abandoned": 2, "impatient": 1, "chat": 2, "json_schema": 1, "n_gt_1": 1, "bad": 3}
TOPICS = ["the sea", "a city at night", "bread", "mountains", "a robot", "the history of tea", "rain", "chess"]


def valid(obj: object) -> bool:
    """SCHEMA, checked by hand."""
    return (isinstance(obj, dict) and set(obj) == {"name", "age", "colour"} and isinstance(obj["name"], str) and len(obj["name"]) <= 16
            and isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
            and obj["colour"] in ("red", "green", "blue"))


class Soak:
    def __init__(self, port: int, name: str):
        self.port, self.name = port, name
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.server_errors: list[str] = []
        self.timeouts: list[str] = []
        self.wrong: list[str] = []
        self.ttfts: list[float] = []
        self.tokens = 0
        self.bad = corpus.load(name)["bad"]

    def note(self, kind: str, status: int | str, problem: str | None = None) -> None:
        with self.lock:
            self.sent[kind] += 1
            self.statuses[f"{kind} {status}"] += 1
            if status == "TimeoutError":  # no answer within the client's 300 s: an overloaded machine, not a server fault
                self.timeouts.append(kind)
            elif isinstance(status, str) or status >= 500:
                self.server_errors.append(f"{kind}: {status}")
            if problem:
                self.wrong.append(f"{kind}: {problem}")

    def post(self, conn: HTTPConnection, path: str, body: dict | bytes, content_type: str = "application/json") -> object:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": content_type})
        return conn.getresponse()

    def one(self, rng: random.Random) -> None:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        conn = HTTPConnection("127.0.0.1", self.port, timeout=0.5 if kind == "impatient" else 300)
        try:
            self.request(kind, rng, conn)
        except TimeoutError:
            self.note(kind, 0 if kind == "impatient" else "TimeoutError")  # the impatient client gives up, as intended
        except (ConnectionError, HTTPException, OSError) as e:
            self.note(kind, type(e).__name__)
        finally:
            conn.close()

    def request(self, kind: str, rng: random.Random, conn: HTTPConnection) -> None:
        prompt = f"Write a few sentences about {rng.choice(TOPICS)}."
        if kind in ("stream", "stream_abandoned"):
            # ignore_eos: the instruct model often ends a bare completion at once, which would leave no first token to time.
            body = {"model": self.name, "prompt": prompt, "max_tokens": rng.randint(16, 128), "temperature": 0.8, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            t = time.perf_counter()
            r = self.post(conn, "/v1/completions", body)
            cut = rng.randint(1, 6) if kind == "stream_abandoned" else None
            first, chunks, done = None, 0, False
            while line := r.readline():
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.note(kind, "stream error chunk", str(chunk))
                        return
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - t
                    if not chunk["choices"]:
                        with self.lock:
                            self.tokens += chunk["usage"]["completion_tokens"]
                    chunks += 1
                done = done or line.startswith(b"data: [DONE]")
                if cut is not None and chunks >= cut:
                    break  # the client walks away mid-stream (the connection is closed by one())
            problem = None if cut is not None or (done and r.status == 200) else f"status {r.status}, [DONE] {done}"
            if cut is None and first is not None:
                with self.lock:
                    self.ttfts.append(first)
            self.note(kind, r.status, problem)
        elif kind == "impatient":
            r = self.post(conn, "/v1/completions", {"model": self.name, "prompt": prompt, "max_tokens": 200, "ignore_eos": True})
            r.read()
            self.note(kind, r.status)
        elif kind in ("chat", "json_schema"):
            body = {"model": self.name, "messages": [{"role": "user", "content": "Describe a person." if kind == "json_schema" else prompt}],
                    "max_tokens": 96, "temperature": 0.8}
            if kind == "json_schema":
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
            r = self.post(conn, "/v1/chat/completions", body)
            out = json.loads(r.read())
            problem = None
            if r.status != 200:
                problem = f"status {r.status}: {out}"
            else:
                with self.lock:
                    self.tokens += out["usage"]["completion_tokens"]
                content = out["choices"][0]["message"]["content"]
                if kind == "json_schema" and out["choices"][0]["finish_reason"] == "stop" and not valid(json.loads(content)):
                    problem = f"output does not follow the schema: {content!r}"
            self.note(kind, r.status, problem)
        elif kind == "n_gt_1":
            n = rng.randint(2, 4)
            body = {"model": self.name, "prompt": prompt, "max_tokens": 32, "n": n, "temperature": 1.0, "seed": rng.randint(0, 1000)}
            r = self.post(conn, "/v1/completions", body)
            out = json.loads(r.read())
            problem = None if r.status == 200 and len(out["choices"]) == n else f"status {r.status}, {len(out.get('choices', []))} choices"
            if r.status == 200:
                with self.lock:
                    self.tokens += out["usage"]["completion_tokens"]
            self.note(kind, r.status, problem)
        else:
            req = rng.choice(self.bad)
            r = self.post(conn, req.endpoint, req.body, content_type=req.content_type)
            out = r.read()
            problem = None if r.status == req.status else f"{req}: status {r.status}, expected {req.status}: {out[:200]!r}"
            self.note(kind, r.status, problem)

    def client(self, seed: int, end: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            self.one(rng)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="mlc serve --threads (1 on a machine other jobs oversubscribe).")
    ap.add_argument("--out", type=Path, default=None, help="Write the figures as JSON here.")
    args = ap.parse_args()
    path = smollm2_hf_dir()
    port = 19000 + os.getpid() % 1000
    log = cache_dir() / "bench" / "soak-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLC_RUNS_DIR": str(cache_dir() / "bench" / "runs")}
    cmd = [sys.executable, "-m", "mlc", "serve", str(path), "--port", str(port), "--dtype", args.dtype, "--kv-cache-memory", "512MiB",
           "--max-model-len", "1024", "--max-queue", "64", "--grace-period", "10"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                sys.exit(f"mlc serve exited with {proc.returncode}: see {log}")
            time.sleep(0.2)
        name = json.loads(get(port, "/v1/models")[1])["data"][0]["id"]
        soak = Soak(port, name)
        start = time.monotonic()
        end = start + args.duration
        threads = [threading.Thread(target=soak.client, args=(args.seed * 1000 + i, end), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        samples: list[tuple[float, float]] = []
        while time.monotonic() < end:
            samples.append((time.monotonic() - start, rss_mb(proc.pid)))
            print(f"{samples[-1][0]:6.0f} s  RSS {samples[-1][1]:7.1f} MB  sent {sum(soak.sent.values()):6d}  5xx/dropped {len(soak.server_errors)}", flush=True)
            time.sleep(min(15.0, max(0.0, end - time.monotonic())))
        for t in threads:
            t.join()
        samples.append((time.monotonic() - start, rss_mb(proc.pid)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = metric_totals(port)
            if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
                break
            time.sleep(0.5)
        m = metric_totals(port)
        health = get(port, "/health")[0]
        rss_start = next((r for t, r in samples if t >= 60), samples[0][1])
        rss_end = samples[-1][1]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    served = {k: v for k, v in soak.statuses.items()}
    result = {
        "duration_s": args.duration, "clients": args.clients, "dtype": args.dtype,
        "requests": sum(soak.sent.values()), "requests_by_kind": dict(soak.sent), "answers": served,
        "server_errors_5xx_or_dropped": len(soak.server_errors), "server_error_samples": soak.server_errors[:10],
        "client_timeouts_300s": len(soak.timeouts),
        "unexpected_answers": len(soak.wrong), "unexpected_samples": soak.wrong[:10],
        "generated_tokens": soak.tokens,
        "ttft_p50_s": percentile(soak.ttfts, 0.5), "ttft_p99_s": percentile(soak.ttfts, 0.99), "ttft_n": len(soak.ttfts),
        "rss_mb_at_60s": rss_start, "rss_mb_at_end": rss_end, "rss_change_pct": 100 * (rss_end - rss_start) / rss_start,
        "rss_mb_samples": [[round(t), round(r, 1)] for t, r in samples],
        "kv_blocks_in_use_idle": m["mlc:kv_cache_total_blocks"] - m["mlc:kv_cache_free_blocks"],
        "kv_cache_usage_perc_idle": m["vllm:kv_cache_usage_perc"],
        "request_success_total": m["vllm:request_success_total"],
        "health_after": health, "exit_code_after_sigterm": code,
        "tracebacks_in_log": log.read_text().count("Traceback"),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb_samples"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
