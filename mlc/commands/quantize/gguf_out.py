"""`mlc quantize --format gguf`: mlc's quantised directory -> one GGUF file llama.cpp runs, with mlc's integers.

The GGUF writer is the `gguf` checkpoint format (plugins/mlc-gguf, reached through mlc.io.formats like
`mlc checkpoint convert --to gguf`). Quantised Linears go to it as mlc's integer weights, which it stores as
Q8_0/Q4_0 blocks of the same integers (mlc_gguf.requant): the file holds what GPTQ or AWQ chose, not a second
rounding of it. Everything else 2-D (embeddings, layers left unquantised) is written F16, which holds bf16
values exactly in its normal range; 1-D tensors (norms) F32, llama.cpp's rule.

`--scheme q4_k_m` instead writes llama.cpp's Q4_K_M mix (mlc.kernels.kquants states the rule) from the
full-precision weights of the source model: k-quant super-blocks carry a fitted 6-bit scale and min per 32
weights, a grid mlc's int4 integers do not lie on, so they cannot be carried over exactly as Q4_0 blocks are.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from mlc.errors import InputError

GGUF_SCHEMES_HINT = ("--format gguf takes symmetric integer outputs (--scheme int8, int4, gptq, awq or mixed, without --asymmetric) "
                     "or --scheme q4_k_m")


def check_gguf_scheme(scheme: Any, asymmetric: bool) -> None:
    """Refuse before quantising what GGML's Q8_0/Q4_0 cannot hold exactly (the writer checks each weight again)."""
    from mlc.errors import MlcUsageError

    if scheme.format == "gguf" and not asymmetric:
        return
    if scheme.format != "compressed-tensors" or scheme.name == "fp8" or asymmetric:
        what = "--asymmetric" if asymmetric else f"--scheme {scheme.name}"
        raise MlcUsageError(f"{what} has no exact GGUF form (GGML stores symmetric int8/int4 blocks: Q8_0, Q4_0)", GGUF_SCHEMES_HINT)


def _gguf_format() -> Any:
    from mlc.io.formats import get_format

    try:
        return get_format("gguf")
    except InputError as e:
        raise InputError(f"--format gguf needs the gguf format plugin: {e}", "pip install -e plugins/mlc-gguf (./setup.sh installs it)") from None


def export_k_quants(model_dir: Path, out_dir: Path, progress: Callable[[str, int, int], None] | None = None) -> Any:
    """Write out_dir/model.gguf as Q4_K_M from model_dir's full-precision weights; a QuantizeResult of what the file holds.

    The report's per-layer errors compare the source weights with the file's, read back through gguf-py's
    dequantisers (not the quantiser's own reconstruction).
    """
    import gguf
    import torch

    from mlc.commands.quantize.quantize import LayerReport, QuantizeResult
    from mlc.contracts.formats import ConvertOptions
    from mlc.io.dense import open_dense
    from mlc.io.formats import get_format
    from mlc.io.hfdir import read_config

    fmt = _gguf_format()
    start = time.perf_counter()
    ckpt = get_format("hf").open(model_dir, ConvertOptions())
    tick = (lambda done, total: progress("writing GGUF Q4_K_M, tensors", done, total)) if progress else None
    try:
        fmt.write(ckpt, out_dir, ConvertOptions(quant="Q4_K_M", extra={"progress": tick}))
    finally:
        ckpt.close()
    seconds = time.perf_counter() - start
    out_file = out_dir / "model.gguf"
    reader = gguf.GGUFReader(out_file)
    types = {t.name: t.tensor_type for t in reader.tensors}
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == str(reader.fields["general.architecture"].contents()))
    names = gguf.get_tensor_name_map(arch, int(read_config(model_dir)["num_hidden_layers"]))
    del reader
    layers = []
    source, written = open_dense(model_dir), open_dense(out_file)
    try:
        for name in written.names():
            kind = types.get(names.get_name(name, try_suffixes=(".weight",)) or "")
            if kind is None or kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                continue
            w, q = source.read(name, torch.float32), written.read(name, torch.float32)
            block, size = gguf.GGML_QUANT_SIZES[kind]
            error = float((w - q).norm() / w.norm().clamp_min(1e-30))
            layers.append(LayerReport(name.removesuffix(".weight"), tuple(w.shape), kind.name, 8 * size / block, error))
    finally:
        source.close()
        written.close()
    return QuantizeResult(layers, {}, seconds)


def gguf_weights_model(model_dir: Path, gguf_file: Path) -> Any:
    """The source model (fp32) with every tensor the GGUF file holds put in, dequantised by gguf-py: what llama.cpp runs."""
    import torch

    from mlc.io.dense import open_dense
    from mlc.models import load_model

    model = load_model(model_dir, dtype=torch.float32)
    params = model.state_dict()  # the model's own storage (a tied head shares the embeddings')
    dense = open_dense(gguf_file)
    try:
        for name in dense.names():  # one tensor at a time: no second copy of the model
            params[name].copy_(dense.read(name, torch.float32))
    finally:
        dense.close()
    return model.eval()


def export_gguf(quant_dir: Path, out_dir: Path) -> None:
    """out_dir/model.gguf from the quantised HF directory quant_dir (its tokenizer files included)."""
    from mlc.commands.quantize.quantize import meta_model
    from mlc.contracts.formats import ConvertOptions, TensorEntry
    from mlc.io.checkpoints.base import Opened
    from mlc.io.hfdir import read_config
    from mlc.io.quant_format import layer_specs, read_layer
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.models.quant_load import linear_names

    fmt = _gguf_format()
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
