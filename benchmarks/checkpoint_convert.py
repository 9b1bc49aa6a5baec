"""mlc checkpoint convert on a 1B-parameter random Llama: wall time and peak RSS per route, against the peers' scripts.

    .venv/bin/python benchmarks/checkpoint_convert.py [--layers 20] [--routes hf-dcp,dcp-hf,...] [--keep]

The model (hidden 2048, 32 heads / 8 KV heads, MLP 5632, vocabulary 32000, untied, float32: about 1.03 B
parameters, 4.1 GB) is written tensor by tensor into an HF directory under the benchmark cache, then every
route runs as its own process; peak RSS is the child's ru_maxrss, measured from this launcher. Peers:
    hf -> dcp     safetensors' load_file + dcp.save (what a one-off script does)
    dcp -> hf     torch's format_utils.dcp_to_torch_save + torch.load + safetensors' save_file (torchtitan's recipe)
    torch -> hf   torch.load + save_file
    hf -> gguf    gguf-py's GGUFWriter with every tensor added first, then written (the non-streaming way)
mlc's times include its run record: hashing the input (cached after the first run) and the output (lineage).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MLC_CACHE", Path.home() / ".cache" / "mlc")) / "bench" / "checkpoint"
PY = sys.executable

PEERS = {
    "hf-dcp": """
import sys, torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
state = {"train.model." + k: v for k, v in load_file(sys.argv[1] + "/model.safetensors").items()}
dcp.save(state, checkpoint_id=sys.argv[2], no_dist=True)
""",
    "dcp-hf": """
import sys, os, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
os.makedirs(sys.argv[2], exist_ok=True)
dcp_to_torch_save(sys.argv[1], sys.argv[2] + "/flat.pt")
state = torch.load(sys.argv[2] + "/flat.pt", weights_only=False)
save_file({k.removeprefix("train.model."): v for k, v in state.items() if k.startswith("train.model.")}, sys.argv[2] + "/model.safetensors")
os.remove(sys.argv[2] + "/flat.pt")
""",
    "torch-hf": """
import sys, os, torch
from safetensors.torch import save_file
os.makedirs(sys.argv[2], exist_ok=True)
save_file(torch.load(sys.argv[1] + "/pytorch_model.bin", weights_only=True), sys.argv[2] + "/model.safetensors")
""",
    "hf-gguf": """
import sys, os, gguf
from safetensors.numpy import load_file
os.makedirs(sys.argv[2], exist_ok=True)
w = gguf.GGUFWriter(sys.argv[2] + "/model.gguf", "llama")
for name, t in load_file(sys.argv[1] + "/model.safetensors").items():
    w.add_tensor(name, t.astype("float16") if t.ndim > 1 else t)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
""",
}
# route -> (source directory name, target format, mlc extra args)
ROUTES = {
    "hf-dcp": ("hf", "dcp", []),
    "dcp-hf": ("dcp", "hf", []),
    "hf-gguf": ("hf", "gguf", ["--quant", "F16"]),
    "dcp-gguf": ("dcp", "gguf", ["--quant", "F16"]),
    "gguf-hf": ("gguf", "hf", []),
    "hf-torch": ("hf", "torch", []),
    "torch-hf": ("torch", "hf", []),
    "hf-universal": ("hf", "universal", []),
}
SOURCES_MADE_BY = {"dcp": "hf-dcp", "gguf": "hf-gguf", "torch": "hf-torch"}


def config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
    }


def make_model(out: Path, layers: int) -> int:
    """A random fp32 Llama written one tensor at a time (with mlc's tiny tokenizer, so it exports to GGUF)."""
    import torch

    from mlc import data
    from mlc.io.hfdir import copy_tokenizer_files
    from mlc.io.safetensors_writer import PlannedTensor, ShardedWriter
    from mlc.models import CausalLM, config_from_hf

    cfg = config(layers)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in CausalLM(config_from_hf(cfg)).named_parameters()}
    out.mkdir(parents=True)
    plan = [PlannedTensor(n, torch.float32, s) for n, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    with ShardedWriter(out, plan, max_shard_bytes=2**40) as w:
        for n, s in shapes.items():
            w.write(n, torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    copy_tokenizer_files(data.tiny_model_dir(), out)
    return sum(torch.Size(s).numel() for s in shapes.values())


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far: run each measurement from a fresh launcher.
    return wall, peak / 1024


def measure(argv: list[str]) -> tuple[float, float]:
    code = f"import sys, json; sys.path.insert(0, {str(REPO)!r}); from benchmarks.checkpoint_convert import timed; print(json.dumps(timed({argv!r})))"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs")
    args = ap.parse_args()
    work = CACHE / f"llama-{args.layers}l"
    src = {"hf": work / "hf"}
    if not (work / "hf" / "config.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        n = make_model(work / "hf", args.layers)
        print(f"made a random Llama of {n / 1e9:.3f} B parameters in {work / 'hf'}", file=sys.stderr)
    runs = work / "runs"
    rows = []
    mlc = [PY, "-m", "mlc", "--runs-dir", str(runs), "checkpoint", "convert"]
    for route in args.routes.split(","):
        source, target, extra = ROUTES[route]
        if source not in src:
            made = work / source
            if not made.exists():
                s, t, e = ROUTES[SOURCES_MADE_BY[source]]
                subprocess.run([*mlc, str(src[s]), "--to", t, "--out", str(made), *e], check=True, capture_output=True)
            src[source] = made
        out = work / f"out-{route}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = measure([*mlc, str(src[source]), "--to", target, "--out", str(out), *extra])
        row = {"route": route, "mlc_s": round(wall, 1), "mlc_rss_mb": round(rss)}
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        if route in PEERS:
            peer_out = work / f"peer-{route}"
            shutil.rmtree(peer_out, ignore_errors=True)
            try:
                pwall, prss = measure([PY, "-c", PEERS[route], str(src[source]), str(peer_out)])
                row.update(peer_s=round(pwall, 1), peer_rss_mb=round(prss))
            except subprocess.CalledProcessError as e:  # e.g. killed for memory on a shared machine
                row.update(peer_error=(e.stderr or "")[-300:] or f"exit {e.returncode}")
            shutil.rmtree(peer_out, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"load_average": os.getloadavg(), "rows": rows}))


if __name__ == "__main__":
    main()
