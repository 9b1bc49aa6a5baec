"""Streaming: peak RSS stays under 3x the largest output tensor + 300 MB, whatever the number of experts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

MB = 2**20


@pytest.fixture(scope="module")
def wide_vocab_model(tmp_path_factory):
    """A 2-layer Llama whose 96 MB embedding dwarfs its MLPs: the largest tensor sets the bound."""
    path = tmp_path_factory.mktemp("wide") / "base"
    path.mkdir()
    vocab, hidden, inter, layers = 49152, 512, 1024, 2
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)), ("mlp.down_proj", (hidden, inter)),
        ):
            tensors[p + name + ".weight"] = torch.randn(shape, generator=g) * 0.02
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
        "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "float32",
    }))
    return path


def peak_rss_mb(args: list[str], tmp_path) -> float:
    """Peak RSS of a fresh `mlc` process running args: its own VmHWM.

    Not getrusage's ru_maxrss: Linux carries the RSS the parent (this pytest process) had at fork across exec,
    so in a full test session ru_maxrss reports the runner's memory, not the upcycle's.
    """
    code = (
        "import sys\n"
        "from mlc.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_is_bounded_by_the_largest_tensor_whatever_e(wide_vocab_model, tmp_path):
    largest = 49152 * 512 * 4 / MB  # 96 MB
    bound = 3 * largest + 300
    runs = str(tmp_path / "runs")
    peaks = {}
    for experts in (2, 32):
        args = ["--runs-dir", runs, "upcycle", str(wide_vocab_model), "--out", str(tmp_path / f"e{experts}"),
                "--experts", str(experts), "--top-k", "2", "--drop-ratio", "0.5"]
        peaks[experts] = peak_rss_mb(args, tmp_path)
    assert peaks[2] < bound and peaks[32] < bound, (peaks, bound)
    assert abs(peaks[32] - peaks[2]) < 30, peaks  # 16x the experts (64 MB -> 1 GB of expert weights): same memory
