"""Load a quantised HF directory into the native model, with quantised Linear modules on the fast paths.

`mlc.models.load_model` hands any directory whose config.json has a `quantization_config` to
`load_quantized_model`, so `load_model(quantized_dir)` just works for serving and evaluation.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from mlc.errors import InputError
from mlc.io.hfdir import read_config, require_model_dir
from mlc.io.quant_format import LayerSpec, layer_specs, read_int_words, read_layer
from mlc.io.safetensors_reader import ModelTensors
from mlc.kernels import packing
from mlc.kernels.quant_linear import Int4Tiles, IntLinear, QuantLinear, quant_linear, takes_int4pack
from mlc.kernels.quant_weights import IntWeight
from mlc.models.config import config_from_hf, dtype_name, parse_dtype, stored_dtype
from mlc.models.transformer import CausalLM


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_quantized_model(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """The native model of a quantised directory: its quantised Linears as QuantLinear modules.

    dtype applies to the tensors kept in floating point (embeddings, norms, unquantised layers).
    """
    path = require_model_dir(path)
    raw = read_config(path)
    qconfig = raw.get("quantization_config")
    if not isinstance(qconfig, dict):
        raise InputError(f"{path} is not quantised: config.json has no quantization_config", "load it with load_model")
    config = config_from_hf(raw)
    with ModelTensors(path) as tensors:
        dtype = parse_dtype(dtype) or stored_dtype(tensors, config.torch_dtype)
        config = config.with_updates(torch_dtype=dtype_name(dtype))
        with torch.device("meta"):
            model = CausalLM(config)
        try:
            specs = layer_specs(qconfig, linear_names(model))
        except (ValueError, KeyError) as e:
            raise InputError(f"{path}: unsupported quantization_config ({e})", "mlc reads the layouts it writes and compressed-tensors weight-only ones") from None

        def read(name: str) -> torch.Tensor:
            if name not in tensors:
                raise InputError(f"{path}: tensor {name} is missing", "the quantised directory is incomplete")
            return tensors.read(name)

        state: dict[str, torch.Tensor] = {}
        for name, spec in specs.items():
            linear = model.get_submodule(name)
            bias = read(f"{name}.bias").to(dtype) if linear.bias is not None else None
            module = _quant_module(name, spec, read, bias, torch.device(device))
            if (module.out_features, module.in_features) != (linear.out_features, linear.in_features):
                raise InputError(f"{path}: {name} is stored as {module.out_features}x{module.in_features}, config.json implies "
                                 f"{linear.out_features}x{linear.in_features}", "config.json does not match the weights")
            set_module(model, name, module)
        if "lm_head" in specs and config.tie_word_embeddings:
            raise InputError(f"{path}: lm_head is quantised but tie_word_embeddings is true", "the quantised directory is inconsistent")
        for name, param in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if param.device.type == "meta":
                state[name] = read(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if "lm_head" not in specs:
        model.tie_weights()
    model.source_dir = path  # type: ignore[assignment]
    model.quantization_config = qconfig  # type: ignore[assignment]
    return model.eval()


def _quant_module(name: str, spec: LayerSpec, read: Callable[[str], torch.Tensor], bias: torch.Tensor | None,
                  device: torch.device) -> QuantLinear:
    """One quantised Linear on device. int4 weights that torch's CPU kernel takes go from the stored words straight to
    its tiles (packing.int4pack_from_words): the [N, K] values are never built, nor the tiles unpacked again."""
    if spec.kind != "int" or spec.bits != 4:
        return quant_linear(read_layer(name, spec, read), bias).to(device)
    words, shape, scale, zero_point = read_int_words(name, spec, read)
    if takes_int4pack(shape, spec.bits, spec.group_size, device) and shape[1] % 8 == 0:
        tiles = packing.int4pack_from_words(words, *shape)
        return IntLinear(Int4Tiles(tiles, scale, zero_point, shape, spec.group_size or shape[1]), bias)
    # Another layout: the values from the words already read (read_layer would read them again).
    return quant_linear(IntWeight(packing.unpack_int32(words, spec.bits, shape[1]), scale, zero_point, spec.bits, spec.group_size), bias).to(device)


def quant_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """The quantised Linear modules of a model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
