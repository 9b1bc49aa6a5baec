"""Build, load and save native models as complete Hugging Face model directories."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mlc.errors import InputError
from mlc.io.hfdir import copy_tokenizer_files, read_config, require_model_dir, write_config
from mlc.io.safetensors_reader import ModelTensors
from mlc.io.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, save_tensors
from mlc.models.config import ModelConfig, config_from_hf, dtype_name, parse_dtype, stored_dtype
from mlc.models.transformer import CausalLM


def build_model(
    config: ModelConfig | dict[str, Any],
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> CausalLM:
    """A randomly initialised model (normal(0, initializer_range) weights, zero biases, unit norms), seeded."""
    if isinstance(config, dict):
        config = config_from_hf(config)
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype)
    config = config.with_updates(torch_dtype=dtype_name(dtype))
    with torch.device("meta"):
        model = CausalLM(config)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty makes new parameters, which unties them
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    for name, param in model.named_parameters():  # named_parameters yields a tied weight once
        data = torch.empty(param.shape, dtype=torch.float32)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            data.fill_(1.0)
        elif name.endswith(".bias"):
            data.zero_()
        else:
            data.normal_(0.0, std, generator=generator)
        with torch.no_grad():
            param.copy_(data)
    return model.to(dtype)


def load_config(path: str | os.PathLike) -> ModelConfig:
    return config_from_hf(read_config(Path(path)))


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    skip: Callable[[str], bool] | None = None,
) -> CausalLM:
    """Load an HF model directory into the native model; dtype defaults to the stored one.

    References (run:<id>, latest:<command>, Hub ids) are resolved by the commands, which pass a path.
    Tensors whose name `skip` accepts are not read: they stay on the meta device for the caller to replace
    (serve's --expert-offload reads experts on demand instead).

    The model remembers its directory in `model.source_dir`, so save_model can carry the tokenizer over.
    """
    path = require_model_dir(Path(path))
    raw = read_config(path)
    if "quantization_config" in raw:  # quantised directories load with mlc's quantised Linear kernels
        from mlc.models.quant_load import load_quantized_model

        return load_quantized_model(path, dtype=dtype, device=device)
    config = config_from_hf(raw)
    with ModelTensors(path) as tensors:
        dtype = parse_dtype(dtype) or stored_dtype(tensors, config.torch_dtype)
        config = config.with_updates(torch_dtype=dtype_name(dtype))
        with torch.device("meta"):
            model = CausalLM(config)
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        expected = shapes.keys()
        missing = [n for n in expected if n not in tensors and not (n == "lm_head.weight" and config.tie_word_embeddings)]
        # A tied checkpoint may still store lm_head.weight (transformers then ignores it; so do we).
        unexpected = [n for n in tensors.names() if n not in expected and not n.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise InputError(_mismatch(path, missing, unexpected), "the weights do not match config.json's architecture")
        state: dict[str, torch.Tensor] = {}
        for name in expected:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            info = tensors.info(name)
            want = shapes[name]
            if info.shape != want:
                raise InputError(f"{path}: tensor {name} has shape {list(info.shape)}, config.json implies {list(want)}", "config.json does not match the weights")
            if skip is not None and skip(name):
                continue
            state[name] = tensors.read(name, dtype).to(device)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.source_dir = path  # type: ignore[assignment]
    return model.eval()


def _mismatch(path: Path, missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
    return f"{path}: " + "; ".join(parts)


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to store: the state dict without the tied lm_head copy (transformers' on-disk layout)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(
    model: CausalLM,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config_updates: dict[str, Any] | None = None,
) -> Path:
    """Write a complete HF directory: config.json, generation_config.json, safetensors, tokenizer files.

    Tokenizer and generation config come from tokenizer_from, else from the directory the model was
    loaded from. out_dir may exist (a staging directory from run.artifact); files in it are overwritten.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype) or next(model.parameters()).dtype
    config = model.config.with_updates(torch_dtype=dtype_name(dtype))
    save_tensors(checkpoint_state(model), out, max_shard_bytes=max_shard_bytes, dtype=dtype)
    hf = config.to_hf()
    hf.update(config_updates or {})
    write_config(out, hf)
    source = tokenizer_from if tokenizer_from is not None else getattr(model, "source_dir", None)
    if source is not None and Path(source).is_dir():
        copy_tokenizer_files(source, out)
    if not (out / "generation_config.json").is_file():
        generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out
