"""Tiny Llama-layout models written straight with safetensors (no transformers import: fast)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_config(vocab: int = 32, hidden: int = 16, layers: int = 3, inter: int = 24, heads: int = 4, kv: int = 2, tied: bool = True) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
        "torch_dtype": "float32",
    }


def llama_tensors(cfg: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, v, i = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kvd = hd * cfg["num_key_value_heads"]
    t = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (h, h),
            "self_attn.k_proj.weight": (kvd, h),
            "self_attn.v_proj.weight": (kvd, h),
            "self_attn.o_proj.weight": (h, h),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }
        for name, shape in shapes.items():
            t[p + name] = torch.randn(*shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0)
    t["model.norm.weight"] = torch.ones(h) + 0.01 * torch.randn(h, generator=g)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = torch.randn(v, h, generator=g)
    return {k: x.to(dtype) for k, x in t.items()}


def perturb(tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (x.double() + scale * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(x.dtype) for k, x in tensors.items()}


def save_model(path: Path, cfg: dict, tensors: dict[str, torch.Tensor], vocab: list[str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if vocab is not None:
        write_wordlevel_tokenizer(path, vocab)
    return path


def write_wordlevel_tokenizer(path: Path, vocab: list[str]) -> None:
    """A whitespace word-level tokenizer whose ids are the list order (what transformers loads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": vocab[0]}))


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
