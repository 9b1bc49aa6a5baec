"""Time and peak RSS of upcycling SmolLM2-135M into 8 experts, top-2, with `mlc upcycle` and with mergekit-moe.

Both read the same fp32 SmolLM2 directory (the real-model test fixture) and write a bfloat16 Mixtral with a
random router; each command runs as a fresh process (wall time includes start-up and imports), alternately,
and the figures are medians over --repeats runs. Peak RSS is the process's own ru_maxrss. mergekit 0.1.5 lives
in a separate venv under the mlc cache (torch==2.13.0 pinned there), shared with the merge benchmark.

    .venv/bin/python benchmarks/upcycle_vs_mergekit.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlc.paths import cache_dir
from tests.conftest import smollm2_hf_dir  # (the real-model fixture's files)

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"  # any other torch request pulls a CUDA build
EXPERTS, TOP_K = 8, 2

# Runs a command and prints its own wall time and peak RSS: the wrapper's RUSAGE_CHILDREN covers only that command.
MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - t
if proc.returncode:
    sys.exit(proc.stderr[-3000:])
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def mergekit_venv() -> Path:
    """The mergekit venv under the cache (created once; the merge benchmark uses the same one)."""
    venv = cache_dir() / "bench" / "mergekit-venv"
    py = venv / "bin" / "python"
    if not py.exists() or subprocess.run([str(py), "-c", "import mergekit"], capture_output=True).returncode:
        print(f"installing {MERGEKIT} into {venv} (once) ...", file=sys.stderr)
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", MERGEKIT, TORCH], check=True)
    return venv


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{command[0]} failed: {proc.stderr}")
    return json.loads(proc.stdout)


def mergekit_config(base: Path) -> str:
    experts = "\n".join(f"  - source_model: {base}" for _ in range(EXPERTS))
    return f"base_model: {base}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: {TOP_K}\nexperts:\n{experts}\n"


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = smollm2_hf_dir()
    venv = mergekit_venv()
    work = Path(tempfile.mkdtemp(prefix="mlc-upcycle-bench-"))
    config = work / "moe.yaml"
    config.write_text(mergekit_config(base))
    env = {**os.environ, "MLC_RUNS_DIR": str(work / "runs")}
    mlc_cmd = [sys.executable, "-m", "mlc", "upcycle", str(base), "--experts", str(EXPERTS), "--top-k", str(TOP_K),
               "--dtype", "bfloat16", "--overwrite", "--out"]
    kit_cmd = [str(venv / "bin" / "mergekit-moe"), str(config), "--i-understand-this-is-not-useful-without-training", "--quiet"]
    results: dict[str, list[dict[str, float]]] = {"mlc": [], "mergekit": []}
    try:
        for i in range(args.repeats):
            results["mlc"].append(measure([*mlc_cmd, str(work / "mlc-out")], env))
            shutil.rmtree(work / "kit-out", ignore_errors=True)
            results["mergekit"].append(measure([*kit_cmd, str(work / "kit-out")]))
            print(f"repeat {i + 1}: mlc {results['mlc'][-1]}  mergekit {results['mergekit'][-1]}", file=sys.stderr)
        out_bytes = sum(f.stat().st_size for f in (work / "mlc-out").glob("*.safetensors"))
        kit_bytes = sum(f.stat().st_size for f in (work / "kit-out").glob("*.safetensors"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        name: {key: round(median([r[key] for r in runs]), 2) for key in ("seconds", "peak_rss_mb")} for name, runs in results.items()
    }
    summary["ratio_mergekit_over_mlc"] = {
        key: round(summary["mergekit"][key] / summary["mlc"][key], 2) for key in ("seconds", "peak_rss_mb")
    }
    summary["output_gb"] = {"mlc": round(out_bytes / 1e9, 3), "mergekit": round(kit_bytes / 1e9, 3)}
    summary["repeats"] = args.repeats
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
