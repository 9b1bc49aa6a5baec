"""Streaming: a conversion's peak RSS follows the largest tensor, not the model (2 layers vs 24 of the same width)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = """
import json, resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(json.dumps(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
"""


def peak_mb(argv: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", LAUNCH, *argv], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1]))


def random_model(out: Path, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from mlc import data
    from mlc.io.hfdir import copy_tokenizer_files, read_config

    cfg = {**read_config(data.tiny_model_dir()), "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
           "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": layers, "tie_word_embeddings": False}
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(2048, 512, generator=g), "lm_head.weight": torch.randn(2048, 512, generator=g),
             "model.norm.weight": torch.ones(512)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (512, 512)), ("self_attn.v_proj", (512, 512)),
                            ("self_attn.o_proj", (512, 512)), ("mlp.gate_proj", (1536, 512)), ("mlp.up_proj", (1536, 512)), ("mlp.down_proj", (512, 1536))):
            state[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(512)
        state[p + "post_attention_layernorm.weight"] = torch.ones(512)
    out.mkdir(parents=True)
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg))
    copy_tokenizer_files(data.tiny_model_dir(), out)
    return out


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_number_of_layers(tmp_path):
    peaks: dict[str, list[float]] = {}
    for layers in (2, 24):  # 15 MB and 150 MB of float32 weights; the largest tensor is 4 MB either way
        hf = random_model(tmp_path / f"hf{layers}", layers)
        mlc = [sys.executable, "-m", "mlc", "--runs-dir", str(tmp_path / "runs"), "checkpoint", "convert"]
        for route, src, to in (("hf-dcp", hf, "dcp"), ("dcp-hf", hf, "hf")):
            if route == "dcp-hf":
                src = tmp_path / f"out-hf-dcp{layers}"
            peaks.setdefault(route, []).append(peak_mb([*mlc, str(src), "--to", to, "--out", str(tmp_path / f"out-{route}{layers}")]))
    for route, (small, big) in peaks.items():
        # Holding the model would add ~135 MB; streaming adds noise only.
        assert big - small < 40, (route, small, big)
