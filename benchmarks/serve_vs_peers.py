"""mlc serve against transformers `generate` and llama.cpp on SmolLM2-135M, in one run.

    .venv/bin/python benchmarks/serve_vs_peers.py [--reps 3] [--decode-tokens 128] [--skip-llamacpp] [--compile]

Batch-1 decode tokens/s: transformers fp32 and bf16, llama.cpp (llama-cpp-python, Q4_1 GGUF, the same
file the real-model test fixture converts), and mlc's engine in bf16, int8 and int4 (quantised by
`mlc quantize`, RTN), and with --compile also with its decode steps compiled (mlc serve --compile,
compiled before timing as the server does before serving). Decode rate = (N - 1) / (time of N tokens - time of 1 token), so prefill is
excluded for everyone. Load: 8 and 32 concurrent requests of 256 random prompt tokens and 128 output
tokens; mlc through its HTTP server (streaming, TTFT = first streamed token), transformers as static
batches of 8 (bf16), llama.cpp one request at a time (llama-cpp-python has no batching). Each figure is
the median of --reps runs; the machine's cores are shared, so compare ratios within one run. Next to
wall-clock tokens/s, each row gives tokens per CPU-second (process CPU time, all threads; for mlc
serve the server process's): on a machine whose cores other jobs also use, that is the steadier
measure of how much work each implementation spends per token.

llama-cpp-python is installed into a benchmark venv under the mlc cache (never a dependency of mlc).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# Every peer runs with OpenMP's defaults (OMP_WAIT_POLICY unset, unless the caller sets it): PASSIVE
# made transformers 1.6x and llama.cpp 3.4x slower at batch-1 decode here, by waking sleeping workers
# for every matmul. Everything torch runs in this process runs on the main thread, for the same reason
# `mlc serve` runs its engine on the thread that loaded the model (see Engine.run).

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import fetch_smollm2_gguf, smollm2_hf_dir  # noqa: E402  (the real-model fixture's files)

from mlc.paths import cache_dir  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"
PROMPT_LEN, OUTPUT_LEN = 256, 128


def medians(reps: int, fn) -> tuple[float, float]:
    """(median wall rate, median CPU rate) of fn() -> (wall rate, cpu rate)."""
    runs = [fn() for _ in range(reps)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


# ---------------------------------------------------------------- transformers
def hf_decode_rate(path: Path, dtype: torch.dtype, batch: int, n: int, reps: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.randint(100, 40000, (batch, 32), generator=torch.Generator().manual_seed(0))

    def timed(tokens: int) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - t, time.process_time() - c

    def once() -> tuple[float, float]:
        (wn, cn), (w1, c1) = timed(n), timed(1)
        return batch * (n - 1) / (wn - w1), batch * (n - 1) / (cn - c1)

    timed(4)
    return medians(reps, once)


def hf_static_batches(path: Path, prompts: list[list[int]], batch: int, reps: int) -> tuple[float, float]:
    """Aggregate output tokens/s serving all prompts as static batches (prefill included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    def once() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN, do_sample=False)
        tokens = len(prompts) * OUTPUT_LEN
        return tokens / (time.perf_counter() - t), tokens / (time.process_time() - c)

    return medians(reps, once)


# ---------------------------------------------------------------- llama.cpp
LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
gguf, n, reps, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
llm = Llama(model_path=gguf, n_ctx=1024, n_threads=2, n_batch=512, verbose=False)
def run(prompt, tokens):
    llm.reset()
    t, c = time.perf_counter(), time.process_time()
    llm.eval(prompt)
    for _ in range(tokens):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    return time.perf_counter() - t, time.process_time() - c
def med(xs):
    return sorted(xs)[len(xs) // 2]
run([1, 2, 3], 4)
short = [1] + list(range(1000, 1031))
decode = []
for _ in range(reps):
    (wn, cn), (w1, c1) = run(short, n), run(short, 1)
    decode.append(((n - 1) / (wn - w1), (n - 1) / (cn - c1)))
aggs = []
for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    for p in prompts:
        run(p, 128)
    aggs.append((len(prompts) * 128 / (time.perf_counter() - t), len(prompts) * 128 / (time.process_time() - c)))
print(json.dumps({"decode": [med([d[0] for d in decode]), med([d[1] for d in decode])],
                  "serial_aggregate": [med([a[0] for a in aggs]), med([a[1] for a in aggs])]}))
"""


def llama_cpp_python() -> Path:
    venv = cache_dir() / "bench" / "llamacpp-venv"
    py = venv / "bin" / "python"
    if not py.exists() or subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode:
        print("installing llama-cpp-python into the benchmark venv (a one-time source build) ...", file=sys.stderr)
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], check=True)
        # Not -march=native: ggml's AMX matmul crashes (SIGSEGV in ggml_backend_amx_mul_mat) in this VM, whose CPU
        # reports AMX. The same AVX-512 kernels (VNNI, BF16) without AMX.
        flags = "NATIVE=OFF AVX=ON AVX2=ON FMA=ON F16C=ON BMI2=ON AVX_VNNI=ON AVX512=ON AVX512_VBMI=ON AVX512_VNNI=ON AVX512_BF16=ON"
        env = {**os.environ, "CMAKE_ARGS": " ".join(f"-DGGML_{f}" for f in flags.split())}
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-cache-dir", f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True, env=env)
    return py


def llama_cpp(gguf: Path, n: int, reps: int, prompts: list[list[int]]) -> dict[str, list[float]]:
    py = llama_cpp_python()
    out = subprocess.run([str(py), "-c", LLAMA_SCRIPT, str(gguf), str(n), str(reps), json.dumps(prompts)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- mlc
def quantized(path: Path, scheme: str) -> Path:
    out = cache_dir() / "bench" / f"smollm2-{scheme}-{path.name}"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mlc", "quantize", str(path), "-s", scheme, *(["-g", "32"] if scheme == "int4" else []), "-o", str(out), "--no-eval", "--overwrite"],
                       check=True, capture_output=True, env={**os.environ, "MLC_RUNS_DIR": str(cache_dir() / "bench" / "runs")})
    return out


def mlc_engine(path: Path, dtype: str | None, compile: bool = False):
    from mlc.commands.serve.engine import Engine, EngineConfig
    from mlc.models import load_model
    from mlc.models.tokenizer import load_tokenizer

    from mlc.models.transformer import fuse_projections

    model = load_model(path, dtype=dtype)
    fuse_projections(model)  # as mlc serve does
    engine = Engine(model, load_tokenizer(path), EngineConfig(num_blocks=512, block_size=16, max_batched_tokens=512, compile=compile))
    engine.warm_up()  # as mlc serve --compile does before serving (a no-op without compile)
    return engine


def mlc_decode_rate(path: Path, dtype: str | None, n: int, reps: int, compile: bool = False) -> tuple[float, float]:
    """Batch-1 decode tokens/s of the engine (no HTTP), stepped in this thread: time from the first to the last token."""
    from mlc.commands.serve.engine import GenerationRequest
    from mlc.kernels.sampling import SamplingParams

    engine = mlc_engine(path, dtype, compile)
    prompt = list(range(1000, 1032))

    def once(tokens: int) -> tuple[float, float]:
        times: list[tuple[float, float]] = []

        def sink(ev):
            times.extend([(time.perf_counter(), time.process_time())] * len(ev.token_ids))

        engine.submit(GenerationRequest(f"r{time.perf_counter()}", prompt, SamplingParams(temperature=0), max_tokens=tokens, ignore_eos=True), sink)
        engine.run_until_idle()  # in this (the loading) thread, as mlc serve's engine thread does
        return (len(times) - 1) / (times[-1][0] - times[0][0]), (len(times) - 1) / (times[-1][1] - times[0][1])

    once(8)
    return medians(reps, lambda: once(n))


def serve_load(path: Path, prompts: list[list[int]], concurrency: int, reps: int, compile: bool = False) -> dict[str, float]:
    """Aggregate output tokens/s and TTFT p50/p99 of `concurrency` streaming requests through mlc serve's HTTP API."""
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "MLC_RUNS_DIR": str(cache_dir() / "bench" / "runs")}
    proc = subprocess.Popen([sys.executable, "-m", "mlc", "serve", str(path), "--port", str(port), "--dtype", "bfloat16",
                             "--kv-cache-memory", "1GiB", "--max-model-len", "1024", *(["--compile"] if compile else [])],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        c = http.client.HTTPConnection("127.0.0.1", port)
        c.request("GET", "/v1/models")
        name = json.loads(c.getresponse().read())["data"][0]["id"]

        def one(prompt: list[int], ttfts: list[float], counts: list[int]) -> None:
            body = {"model": name, "prompt": prompt, "max_tokens": OUTPUT_LEN, "ignore_eos": True, "temperature": 0, "stream": True}
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            t = time.perf_counter()
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            first = None
            tokens = 0
            for line in resp:
                if line.startswith(b"data: {"):
                    if first is None:
                        first = time.perf_counter() - t
                    tokens += 1
            ttfts.append(first)
            counts.append(tokens)

        def server_cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

        def run() -> dict[str, float]:
            c = http.client.HTTPConnection("127.0.0.1", port)
            c.request("POST", "/reset_prefix_cache")
            c.getresponse().read()
            cpu = server_cpu()
            ttfts: list[float] = []
            counts: list[int] = []
            threads = [threading.Thread(target=one, args=(p, ttfts, counts)) for p in prompts[:concurrency]]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            ttfts.sort()
            return {"aggregate": concurrency * OUTPUT_LEN / wall, "per_cpu_s": concurrency * OUTPUT_LEN / (server_cpu() - cpu), "ttft_p50": ttfts[len(ttfts) // 2], "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}

        run()  # warm-up
        results = [run() for _ in range(reps)]
        return {k: statistics.median(r[k] for r in results) for k in results[0]}
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-load", action="store_true", help="Batch-1 decode only (and llama.cpp's one-at-a-time aggregate).")
    ap.add_argument("--compile", action="store_true", help="Also measure mlc with its decode steps compiled (mlc serve --compile).")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = smollm2_hf_dir()
    gguf = fetch_smollm2_gguf(cache_dir())
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(32)]
    n, reps = args.decode_tokens, args.reps
    rows: dict[str, tuple[float, float]] = {}
    print(f"## batch-1 decode (median of {reps}; batch 8 is aggregate)   tokens/s   tokens/CPU-s", flush=True)

    def row(name: str, value: tuple[float, float]) -> None:
        rows[name] = value
        print(f"{name:40s} {value[0]:8.1f} {value[1]:12.1f}", flush=True)

    def ratio(a: str, b: str) -> str:
        return f"{rows[a][0] / rows[b][0]:.2f}x wall, {rows[a][1] / rows[b][1]:.2f}x per CPU-second"

    row("transformers fp32 batch 1", hf_decode_rate(path, torch.float32, 1, n, reps))
    row("transformers bf16 batch 1", hf_decode_rate(path, torch.bfloat16, 1, n, reps))
    row("transformers bf16 batch 8", hf_decode_rate(path, torch.bfloat16, 8, n, reps))
    row("mlc bf16 batch 1", mlc_decode_rate(path, "bfloat16", n, reps))
    row("mlc int8 batch 1", mlc_decode_rate(quantized(path, "int8"), "bfloat16", n, reps))
    row("mlc int4 batch 1", mlc_decode_rate(quantized(path, "int4"), "bfloat16", n, reps))
    if args.compile:
        row("mlc bf16 batch 1, compiled", mlc_decode_rate(path, "bfloat16", n, reps, compile=True))
        row("mlc int4 batch 1, compiled", mlc_decode_rate(quantized(path, "int4"), "bfloat16", n, reps, compile=True))
    llama = None
    if not args.skip_llamacpp:
        llama = llama_cpp(gguf, n, reps, prompts[:8])
        row("llama.cpp Q4_1 batch 1", tuple(llama["decode"]))
    for mode in ("", ", compiled") if args.compile else ("",):
        print(f"mlc bf16{mode} / transformers bf16: {ratio(f'mlc bf16 batch 1{mode}', 'transformers bf16 batch 1')} (target >= 1.5x)")
        if llama:
            print(f"mlc int4{mode} / llama.cpp Q4_1:    {ratio(f'mlc int4 batch 1{mode}', 'llama.cpp Q4_1 batch 1')} (target >= 0.75x)")

    if args.skip_load:
        if llama:
            agg = llama["serial_aggregate"]
            print(f"llama.cpp one request at a time (8 x {PROMPT_LEN} + {OUTPUT_LEN}): {agg[0]:.1f} tokens/s, {agg[1]:.1f} per CPU-s")
        return
    print(f"\n## load: {PROMPT_LEN}-token prompts, {OUTPUT_LEN} output tokens, bf16: aggregate output tokens/s and per CPU-second", flush=True)
    hf8 = hf_static_batches(path, prompts, 8, max(1, reps - 2))
    print(f"transformers static batch 8, 32 requests: {hf8[0]:.1f} tokens/s, {hf8[1]:.1f} per CPU-s", flush=True)
    if llama:
        agg = llama["serial_aggregate"]
        print(f"llama.cpp one request at a time (8):      {agg[0]:.1f} tokens/s, {agg[1]:.1f} per CPU-s", flush=True)
    for conc, compile in [(8, False), (32, False)] + ([(32, True)] if args.compile else []):
        r = serve_load(path, prompts, conc, reps, compile)
        line = (f"mlc serve{' --compile' if compile else ''}, {conc} concurrent: {r['aggregate']:.1f} tokens/s, {r['per_cpu_s']:.1f} per CPU-s, "
                f"TTFT p50 {r['ttft_p50']:.2f} s, p99 {r['ttft_p99']:.2f} s")
        if conc == 32:
            line += f"\n  vs transformers batch 8: {r['aggregate'] / hf8[0]:.2f}x wall, {r['per_cpu_s'] / hf8[1]:.2f}x per CPU-s (target >= 1.5x)"
            if llama:
                line += f"\n  vs llama.cpp: {r['aggregate'] / agg[0]:.2f}x wall, {r['per_cpu_s'] / agg[1]:.2f}x per CPU-s (target >= 3x)"
        print(line, flush=True)

if __name__ == "__main__":
    main()
