"""The model to train: built from a config or loaded from a trained model, optionally wrapped with LoRA (peft)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mlc.commands.train.config import LoraSection, TrainConfig, config_json_path
from mlc.models import CausalLM, ModelConfig, build_model, config_from_hf, load_model


def model_config(config: TrainConfig, init_dir: Path | None) -> ModelConfig:
    source = config_json_path(config) if config.model.config else init_dir / "config.json"
    return config_from_hf(json.loads(Path(source).read_text()))


def create_model(config: TrainConfig, init_dir: Path | None) -> CausalLM:
    """A fresh model (seeded by train.seed, same on every process) or the trained one at init_dir, in model.dtype."""
    if init_dir is not None:
        return load_model(init_dir, dtype=config.model.dtype).train()
    raw = json.loads(config_json_path(config).read_text())
    return build_model(raw, seed=config.train.seed, dtype=config.model.dtype).train()


def add_lora(model: CausalLM, lora: LoraSection) -> nn.Module:
    """The model with LoRA adapters on the target modules; only the adapters are trainable (on an NF4 base: QLoRA)."""
    from peft import LoraConfig, get_peft_model

    # No task_type: peft's causal-LM wrapper would call forward with transformers' keyword arguments.
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules))
    # Seeing config.model_type == "mixtral", peft renames w1/w2/w3 to transformers 5's fused expert tensors; mlc
    # keeps one nn.Linear per expert (the on-disk layout), so hide the config while peft chooses its targets.
    config = model.config
    del model.config
    try:
        peft_model = get_peft_model(model, peft_config)
    finally:
        model.config = config
    if lora.base == "nf4":  # after peft: it wraps nn.Linear targets, whose base layers are then quantised
        from mlc.commands.train.qlora import quantize_base

        quantize_base(blocks(peft_model))
    return peft_model


def causal_lm(model: nn.Module) -> CausalLM:
    """The CausalLM inside whatever wraps it (DDP, peft)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, each an FSDP2 unit."""
    return list(causal_lm(model).model.layers)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls for one token: all but the embedding table, inactive experts left out.

    The output head counts even when tied to the embeddings (it is a real matmul); only the lookup does not.
    """
    with torch.device("meta"):
        model = CausalLM(cfg)
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name == "model.embed_tokens.weight":
            continue
        n = p.numel()
        if ".experts." in name:
            n = n * cfg.num_experts_per_tok / cfg.num_experts
        total += n
    return int(total)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, torchtitan's count: 6 * matmul params + 12 * layers * heads * head_dim * seq_len.

    The attention term counts the score and value matmuls forward and backward, ignoring causal sparsity.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
