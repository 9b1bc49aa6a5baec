"""`mlc quantize --format gguf`: mlc's quantised directory -> one GGUF file llama.cpp runs, with mlc's integers.

The GGUF writer is the `gguf` checkpoint format (plugins/mlc-gguf, reached through mlc.io.formats like
`mlc checkpoint convert --to gguf`). Quantised Linears go to it as mlc's integer weights, which it stores as
Q8_0/Q4_0 blocks of the same integers (mlc_gguf.requant): the file holds what GPTQ or AWQ chose, not a second
rounding of it. Everything else 2-D (embeddings, layers left unquantised) is written F16, which holds bf16
values exactly in its normal range; 1-D tensors (norms) F32, llama.cpp's rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlc.errors import InputError

GGUF_SCHEMES_HINT = "--format gguf takes symmetric integer outputs: --scheme int8, int4, gptq, awq or mixed (without --asymmetric)"


def check_gguf_scheme(scheme: Any, asymmetric: bool) -> None:
    """Refuse before quantising what GGML's Q8_0/Q4_0 cannot hold exactly (the writer checks each weight again)."""
    from mlc.errors import MlcUsageError

    if scheme.format != "compressed-tensors" or scheme.name == "fp8" or asymmetric:
        what = "--asymmetric" if asymmetric else f"--scheme {scheme.name}"
        raise MlcUsageError(f"{what} has no exact GGUF form (GGML stores symmetric int8/int4 blocks: Q8_0, Q4_0)", GGUF_SCHEMES_HINT)


def export_gguf(quant_dir: Path, out_dir: Path) -> None:
    """out_dir/model.gguf from the quantised HF directory quant_dir (its tokenizer files included)."""
    from mlc.commands.quantize.quantize import meta_model
    from mlc.contracts.formats import ConvertOptions, TensorEntry
    from mlc.io.checkpoints.base import Opened
    from mlc.io.formats import get_format
    from mlc.io.hfdir import read_config
    from mlc.io.quant_format import layer_specs, read_layer
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.models.quant_load import linear_names

    try:
        fmt = get_format("gguf")
    except InputError as e:
        raise InputError(f"--format gguf needs the gguf format plugin: {e}", "pip install -e plugins/mlc-gguf (./setup.sh installs it)") from None
    config = read_config(quant_dir)
    qconfig = config.pop("quantization_config")
    model = meta_model(quant_dir)
    specs = layer_specs(qconfig, linear_names(model))
    with ModelTensors(quant_dir) as tensors:
        def layer_of(name: str) -> str | None:
            layer = name.removesuffix(".weight")
            return layer if name.endswith(".weight") and layer in specs else None

        entries = []
        for name, p in model.state_dict().items():
            if layer_of(name):
                entries.append(TensorEntry(name, "float32", tuple(p.shape)))
            elif name in tensors:
                entries.append(TensorEntry(name, str(tensors.info(name).dtype).removeprefix("torch."), tuple(tensors.info(name).shape)))

        def int_weights(name: str) -> Any:
            layer = layer_of(name)
            return read_layer(layer, specs[layer], tensors.read) if layer else None

        def read(name: str) -> Any:
            layer = layer_of(name)
            return read_layer(layer, specs[layer], tensors.read).dequantize() if layer else tensors.read(name)

        ckpt = Opened("mlc-quantized", quant_dir, entries, read, config, quant_dir)
        fmt.write(ckpt, out_dir, ConvertOptions(quant="F16", extra={"int_weights": int_weights}))
