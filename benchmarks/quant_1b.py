"""Time and peak memory of `mlc quantize` (RTN, GPTQ) on a 1B-parameter Llama with random weights, against its bf16 size.

The model is made here (seeded random bf16 weights, a TinyLlama-like shape: hidden 2048, 21 layers, MLP 5632,
32 heads / 4 KV heads, SmolLM2's 49152-token vocabulary and tokenizer, tied embeddings; about 1.03B parameters)
and cached. Each setting runs as its own `mlc quantize ... --no-eval --json` process, measured with wait4 like
benchmarks/quant_quality.py (no perplexity: the weights are random). The issue's bound is peak RSS <= 1.5x the
bf16 model's size.

    .venv/bin/python benchmarks/quant_1b.py --setting "int4 -g 64" --setting "gptq -g 64 --samples 32"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 21, "num_attention_heads": 32,
         "num_key_value_heads": 4, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 2048}


def make_model(tokenizer_dir: Path, out: Path) -> Path:
    """Seeded random bf16 weights written one tensor at a time (a 1B model built in memory needs 4 GB of RSS)."""
    import torch

    from mlc.io.hfdir import copy_tokenizer_files, read_config, write_config
    from mlc.io.safetensors_writer import ShardedWriter
    from mlc.models.config import config_from_hf
    from mlc.models.transformer import CausalLM

    if (out / "config.json").is_file():
        return out
    config = read_config(tokenizer_dir) | SHAPE | {"torch_dtype": "bfloat16"}
    config.pop("quantization_config", None)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in CausalLM(config_from_hf(config)).state_dict().items() if n != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    with ShardedWriter(out, [(n, torch.bfloat16, s) for n, s in shapes.items()]) as writer:
        for name, shape in shapes.items():
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            writer.write(name, t.to(torch.bfloat16))
    write_config(out, config)
    copy_tokenizer_files(tokenizer_dir, out)
    return out


def main() -> None:
    from quant_quality import run_setting

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-from", type=Path, help="an HF directory whose tokenizer the model gets (default: SmolLM2's test fixture)")
    ap.add_argument("--setting", action="append", default=[])
    ap.add_argument("--work", type=Path, help="where the model (2 GB) and the outputs go (default: ~/.cache/mlc/bench and a temporary directory)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if args.tokenizer_from is None:
        sys.path.insert(0, str(Path(__file__).parent.parent))
        from tests.conftest import smollm2_hf_dir

        args.tokenizer_from = smollm2_hf_dir()
    from mlc.paths import cache_dir

    model = make_model(args.tokenizer_from, (args.work or cache_dir() / "bench") / "random-1b")
    from mlc.io.safetensors_reader import ModelTensors

    with ModelTensors(model) as t:
        params = sum(t.info(n).numel for n in t.names())
    bf16_mb = params * 2 / 2**20
    work = Path(tempfile.mkdtemp(prefix="quant-1b-", dir=args.work))
    print(f"{model}: {params / 1e9:.3f}B parameters, bf16 {bf16_mb:.0f} MiB, bound 1.5x = {1.5 * bf16_mb:.0f} MiB\n")
    print("| setting | quantise s | process wall s | process CPU s | peak RSS MiB | peak RSS / bf16 size |")
    print("|---|---|---|---|---|---|")
    results = []
    for i, setting in enumerate(args.setting):
        r = run_setting(model, setting, work / f"out{i}", work / "runs")
        results.append(r)
        if "error" in r:
            print(f"| `{setting}` | error: {r['error']} | | | | |", flush=True)
            continue
        print(f"| `{setting}` | {r['report']['quantize_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / bf16_mb:.2f}x |", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"params": params, "bf16_mib": bf16_mb, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
