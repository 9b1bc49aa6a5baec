"""mlc serve against transformers `generate` and llama.cpp on SmolLM2-135M, in one run.

    .venv/bin/python benchmarks/serve_vs_peers.py [--reps 3] [--decode-tokens 128] [--skip-llamacpp] [--skip-decode] [--compile]
    .venv/bin/python benchmarks/serve_vs_peers.py --model 1b [--concurrency 32]

`--model 1b` runs the same rows on a 1.03B-parameter Llama with seeded random bf16 weights (benchmarks/quant_1b.py's
model, SmolLM2's tokenizer), to show how cost grows: llama.cpp then reads the Q4_0 GGUF that
`mlc quantize -s int4 -g 32 --format gguf` writes (the same integers as mlc's int4 rows), and a load-time section
times opening each model (mlc's mmap'd load, transformers' from_pretrained, llama.cpp's Llama()); the transformers
fp32 row is skipped (4 GB of weights).

Batch-1 decode tokens/s: transformers fp32 and bf16, llama.cpp (llama-cpp-python, Q4_1 GGUF, the same
file the real-model test fixture converts), and mlc's engine in bf16, int8 and int4 (quantised by
`mlc quantize`, RTN), and with --compile also with its decode steps compiled (mlc serve --compile,
compiled before timing as the server does before serving). Decode rate = (N - 1) / (time of N tokens - time of 1 token), so prefill is
excluded for everyone. Each figure is the median of --reps runs.

Serving under load is measured with `mlc bench sweep` (`mlc bench serve`'s measurement, one server
start per setting, vLLM's metric definitions): the same 32 random prompts of 256 tokens (made with
SmolLM2's tokenizer, sent as text), 128 output tokens each (EOS ignored), greedy, at 8 and 32
concurrent streams, against mlc serve (bf16, int4, and with --compile bf16 compiled) and llama.cpp's
own server (`llama-server`, built from the same pinned llama.cpp as the decode rows, Q4_1, 32 slots of
continuous batching), every server with --threads threads (default: all cores). transformers has no server: its row is `generate` over static
batches of 8 (bf16). Next to wall-clock tokens/s, each row gives tokens per CPU-second of the server
process (all threads): on a machine whose cores other jobs also use, the steadier measure of work per
token. The machine's cores are shared, so compare ratios within one run.

llama-cpp-python and llama-server are built under the mlc cache (never dependencies of mlc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Every peer runs with OpenMP's defaults (OMP_WAIT_POLICY unset, unless the caller sets it): PASSIVE
# made transformers 1.6x and llama.cpp 3.4x slower at batch-1 decode here, by waking sleeping workers
# for every matmul. Everything torch runs in this process runs on the main thread, for the same reason
# `mlc serve` runs its engine on the thread that loaded the model (see Engine.run).
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlc.paths import cache_dir
from tests.conftest import fetch_smollm2_gguf, smollm2_hf_dir  # (the real-model fixture's files)

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
gguf, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
llm = Llama(model_path=gguf, n_ctx=1024, n_threads=2, n_batch=512, verbose=False)
load_s = time.perf_counter() - t0
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
print(json.dumps({"decode": [med([d[0] for d in decode]), med([d[1] for d in decode])], "load_s": load_s}))
"""


# /proc/cpuinfo flag -> ggml's CMake option. Not -march=native: ggml's AMX matmul crashed (SIGSEGV in
# ggml_backend_amx_mul_mat) in a VM whose CPU reports AMX. And not a fixed list: one made for a Xeon (AVX-VNNI) dies
# with SIGILL on an AMD EPYC, which has AVX-512 VNNI but not the VEX-encoded AVX-VNNI.
GGML_ISA = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI",
            "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16"}


def ggml_flags() -> list[str]:
    """-DGGML_* options for the kernels this CPU has (AMX left out, see GGML_ISA)."""
    have = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                break
    return ["-DGGML_NATIVE=OFF", *(f"-DGGML_{opt}={'ON' if flag in have else 'OFF'}" for flag, opt in GGML_ISA.items())]


def _isa_tag() -> str:
    """Builds are kept per instruction-set choice: a cache copied from another CPU is not reused."""
    import hashlib

    return hashlib.sha256(" ".join(ggml_flags()).encode()).hexdigest()[:8]


def llama_cpp_python() -> Path:
    venv = cache_dir() / "bench" / f"llamacpp-venv-{_isa_tag()}"
    py = venv / "bin" / "python"
    if not py.exists() or subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode:
        print("installing llama-cpp-python into the benchmark venv (a one-time source build) ...", file=sys.stderr)
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], check=True)
        env = {**os.environ, "CMAKE_ARGS": " ".join(ggml_flags())}
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-cache-dir", f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True, env=env)
    return py


def llama_cpp(gguf: Path, n: int, reps: int) -> dict[str, list[float]]:
    py = llama_cpp_python()
    out = subprocess.run([str(py), "-c", LLAMA_SCRIPT, str(gguf), str(n), str(reps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_server() -> Path:
    """llama.cpp's own server, built once from the llama.cpp that the pinned llama-cpp-python vendors (same flags)."""
    src = cache_dir() / "bench" / "src"
    tree = src / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    build = tree / f"build-{_isa_tag()}"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    print("building llama.cpp's llama-server (a one-time build) ...", file=sys.stderr)
    src.mkdir(parents=True, exist_ok=True)
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(src)], check=True)
    if not (tree / "CMakeLists.txt").exists():
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(src), f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp"], check=True)
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *ggml_flags()], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)], check=True, capture_output=True)
    return binary


# ---------------------------------------------------------------- mlc
def quantized(path: Path, scheme: str, fmt: str = "hf") -> Path:
    """mlc quantize's output for the model (int4: groups of 32, as llama.cpp's Q4_0 blocks), made once into the cache."""
    out = cache_dir() / "bench" / f"{path.name}-{scheme}{'-gguf' if fmt == 'gguf' else ''}"
    done = out / ("model.gguf" if fmt == "gguf" else "config.json")
    if not done.is_file():
        subprocess.run([sys.executable, "-m", "mlc", "quantize", str(path), "-s", scheme, *(["-g", "32"] if scheme == "int4" else []), "-o", str(out),
                        "--format", fmt, "--no-eval", "--overwrite"],
                       check=True, capture_output=True, env={**os.environ, "MLC_RUNS_DIR": str(cache_dir() / "bench" / "runs")})
    return done if fmt == "gguf" else out


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


def bench_sweep(template: str, var: dict[str, str], grid: dict[str, str], tokenizer: Path, extra: list[str] = (), concurrency: str = "8,32") -> list[dict]:
    """`mlc bench sweep` of one server (settings in grid) at 8 and 32 concurrent streams: its points as JSON."""
    args = [sys.executable, "-m", "mlc", "bench", "sweep", "--server-template", template,
            *(x for k, v in var.items() for x in ("--var", f"{k}={v}")), *(x for k, v in grid.items() for x in ("--grid", f"{k}={v}")),
            "--load", f"concurrency={concurrency}", "--num-prompts", "32", "--num-warmups", "2", "--dataset", "random", "--input-len", str(PROMPT_LEN),
            "--output-len", str(OUTPUT_LEN), "--tokenizer", str(tokenizer), "--temperature", "0", "--seed", "0", "--server-timeout", "900", *extra, "--json"]
    env = {**os.environ, "MLC_RUNS_DIR": str(cache_dir() / "bench" / "runs")}
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"mlc bench sweep failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)["points"]


def decode_section(args: argparse.Namespace, path: Path, gguf: Path, gguf_type: str, rows: dict[str, tuple[float, float]]) -> None:
    n, reps = args.decode_tokens, args.reps
    llama_row = f"llama.cpp {gguf_type} batch 1"
    print(f"## batch-1 decode (median of {reps}; batch 8 is aggregate)   tokens/s   tokens/CPU-s", flush=True)

    def row(name: str, value: tuple[float, float]) -> None:
        rows[name] = value
        print(f"{name:40s} {value[0]:8.1f} {value[1]:12.1f}", flush=True)

    def ratio(a: str, b: str) -> str:
        return f"{rows[a][0] / rows[b][0]:.2f}x wall, {rows[a][1] / rows[b][1]:.2f}x per CPU-second"

    if args.model != "1b":
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
        llama = llama_cpp(gguf, n, reps)
        row(llama_row, tuple(llama["decode"]))
    for mode in ("", ", compiled") if args.compile else ("",):
        print(f"mlc bf16{mode} / transformers bf16: {ratio(f'mlc bf16 batch 1{mode}', 'transformers bf16 batch 1')} (target >= 1.5x)")
        if llama:
            print(f"mlc int4{mode} / {llama_row[:-8]}:    {ratio(f'mlc int4 batch 1{mode}', llama_row)} (target >= 0.75x)")


def load_section(args: argparse.Namespace, path: Path, gguf: Path, gguf_type: str) -> None:
    """Seconds to open each model, ready to run (mlc: load_model, weights mmap'd where they are stored as served;
    transformers: from_pretrained in bf16; llama.cpp: Llama() on the GGUF). Each in a fresh process, page cache warm
    (each is opened once before timing)."""
    script = (
        "import sys, time; t = time.perf_counter(); kind, path = sys.argv[1], sys.argv[2]\n"
        "if kind == 'mlc':\n    from mlc.models import load_model; m = load_model(path, dtype='bfloat16')\n"
        "else:\n    import torch; from transformers import AutoModelForCausalLM; m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)\n"
        "print(time.perf_counter() - t)"
    )

    def timed(kind: str, model: Path) -> float:
        def once() -> float:
            out = subprocess.run([sys.executable, "-c", script, kind, str(model)], capture_output=True, text=True, check=True)
            return float(out.stdout.strip().splitlines()[-1])

        once()
        return statistics.median(once() for _ in range(args.reps))

    print(f"\n## load time (seconds, median of {args.reps}, warm page cache; imports excluded)", flush=True)
    print(f"{'mlc bf16':40s} {timed('mlc', path):8.2f}", flush=True)
    print(f"{'mlc int4':40s} {timed('mlc', quantized(path, 'int4')):8.2f}", flush=True)
    print(f"{'transformers bf16':40s} {timed('hf', path):8.2f}", flush=True)
    if not args.skip_llamacpp:
        print(f"{'llama.cpp ' + gguf_type:40s} {llama_cpp(gguf, 4, 1)['load_s']:8.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-load", action="store_true", help="Batch-1 decode only.")
    ap.add_argument("--skip-decode", action="store_true", help="Serving under load only (no llama-cpp-python build needed).")
    ap.add_argument("--compile", action="store_true", help="Also measure mlc with its decode steps compiled (mlc serve --compile).")
    ap.add_argument("--model", choices=("smollm2", "1b"), default="smollm2",
                    help="smollm2: SmolLM2-135M (llama.cpp reads the Q4_1 GGUF it ships in). 1b: a 1.03B Llama with random weights.")
    ap.add_argument("--concurrency", default="8,32", help="Concurrent streams of the serving-under-load section (comma-separated).")
    ap.add_argument("--threads", type=int, default=None,
                    help="Threads of every server under load (mlc serve --threads, llama-server -t/-tb, transformers' torch threads). "
                         "Default: all cores. On a machine other jobs oversubscribe, 1 avoids OpenMP barriers waiting on descheduled threads.")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.model == "1b":
        from quant_1b import make_model

        path = make_model(smollm2_hf_dir(), cache_dir() / "bench" / "random-1b")
        gguf, gguf_type = quantized(path, "int4", fmt="gguf"), "Q4_0"
    else:
        path = smollm2_hf_dir()
        gguf, gguf_type = fetch_smollm2_gguf(cache_dir()), "Q4_1"
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(32)]
    reps = args.reps
    rows: dict[str, tuple[float, float]] = {}
    if not args.skip_decode:
        decode_section(args, path, gguf, gguf_type, rows)
        if args.model == "1b":
            load_section(args, path, gguf, gguf_type)
    if args.skip_load:
        return
    print(f"\n## load: {PROMPT_LEN}-token prompts, {OUTPUT_LEN} output tokens: aggregate output tokens/s and per CPU-second of the server", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf8 = hf_static_batches(path, prompts, 8, max(1, reps - 2))
    print(f"transformers bf16 static batches of 8, 32 requests: {hf8[0]:.1f} tokens/s, {hf8[1]:.1f} per CPU-s", flush=True)
    int4 = quantized(path, "int4")
    threads = f" --threads {args.threads}" if args.threads else ""
    template = "mlc serve {model} --port {port} --dtype bfloat16 --kv-cache-memory 1GiB --max-model-len 1024 {compile?--compile}" + threads
    points = bench_sweep(template, {}, {"model": f"{path},{int4}", "compile": "0,1" if args.compile else "0"}, path, concurrency=args.concurrency)
    named = {}
    for p in points:
        kind = "int4" if p["server_params"]["model"] == str(int4) else "bf16"
        if kind == "int4" and p["server_params"]["compile"] == "1":
            continue  # --compile rows: bf16 only, as before
        named[f"mlc serve {kind}{' --compile' if p['server_params']['compile'] == '1' else ''}", int(p["load_params"]["concurrency"])] = p
    if not args.skip_llamacpp:
        server = llama_server()
        t = args.threads or os.cpu_count() or 2
        llama_template = f"{server} -m {gguf} --host 127.0.0.1 --port {{port}} -t {t} -tb {t} -c 16384 --parallel 32 --no-webui"
        for p in bench_sweep(llama_template, {}, {}, path, concurrency=args.concurrency):
            named[f"llama.cpp llama-server {gguf_type}", int(p["load_params"]["concurrency"])] = p
    print(f"{'server':32s} {'streams':>7s} {'tok/s':>8s} {'per CPU-s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'TPOT p50':>9s} {'start':>6s}")
    for (name, conc), p in named.items():
        r = p["result"]
        if r is None:
            print(f"{name:32s} {conc:7d} failed: {p['error']}")
            continue
        cold = f"{r['cold_start']['healthy_s']:5.1f}s" if r.get("cold_start") else ""
        print(f"{name:32s} {conc:7d} {r['output_throughput']:8.1f} {r['output_tokens_per_server_cpu_s']:9.1f} {r['median_ttft_ms'] / 1000:8.2f}s "
              f"{r['p99_ttft_ms'] / 1000:8.2f}s {r['median_tpot_ms']:7.1f}ms {cold:>6s}", flush=True)

    def vs(a: str, b: str, target: str = "") -> None:
        ra, rb = named.get((a, 32), {}).get("result"), named.get((b, 32), {}).get("result")
        if ra and rb:
            print(f"{a} / {b} at 32 streams: {ra['output_throughput'] / rb['output_throughput']:.2f}x wall, "
                  f"{ra['output_tokens_per_server_cpu_s'] / rb['output_tokens_per_server_cpu_s']:.2f}x per CPU-s{target}")

    r32 = named.get(("mlc serve bf16", 32), {}).get("result")
    if r32:
        print(f"mlc serve bf16 / transformers static batch 8 at 32 streams: {r32['output_throughput'] / hf8[0]:.2f}x wall, "
              f"{r32['output_tokens_per_server_cpu_s'] / hf8[1]:.2f}x per CPU-s (target >= 1.5x)")
    vs("mlc serve bf16", f"llama.cpp llama-server {gguf_type}")
    vs("mlc serve int4", f"llama.cpp llama-server {gguf_type}")
    if args.compile:
        vs("mlc serve bf16 --compile", f"llama.cpp llama-server {gguf_type}")


if __name__ == "__main__":
    main()
