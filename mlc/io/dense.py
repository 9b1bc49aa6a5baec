"""Any model's weights as dense floating tensors under Hugging Face names, listed cheaply and read one at a time.

For tools that compute on weights (mlc merge), whatever the checkpoint holds:
  - an HF directory: its safetensors as stored (ModelTensors itself, nothing added);
  - an HF directory whose config.json has a quantization_config (compressed-tensors pack-quantized or
    float-quantized, or one of mlc's layouts): each quantised Linear's weight is dequantised when it is
    read, in the dtype of its scales (as compressed-tensors dequantises), and its storage tensors
    (weight_packed, weight_scale, ...) are not listed;
  - anything an installed checkpoint format opens (a GGUF file through plugins/mlc-gguf, DCP, ...),
    through the format's own reader (GGUF tensors come dequantised to float32).
`open_dense(path)` returns a DenseModel: `names()`, `info(name)` (dtype, shape, nbytes), `read(name)`,
`close()`, plus the model's HF `config`, the directory of its tokenizer files (`assets`) and `source`,
a few words on what was read (for provenance: "gguf Q4_1, dequantised").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mlc.errors import InputError


@dataclass(frozen=True)
class DenseInfo:
    """A listed tensor: name, dtype and shape as read() returns it, and its size in bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class DenseModel:
    """A model's dense tensors: listed up front, each read on demand (the caller frees it)."""

    path: Path
    infos: dict[str, Any]  # name -> DenseInfo or safetensors TensorInfo (both have dtype, shape, nbytes)
    reader: Callable[[str], torch.Tensor]
    config: dict[str, Any]
    assets: Path | None  # where tokenizer files are (the directory itself for HF directories)
    source: str  # what was read: "hf", "compressed-tensors int4 (dequantised)", "gguf Q4_1 (dequantised)"
    closer: Callable[[], None] | None = None
    quantized: bool = False  # dequantised on read
    extra: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> Any:
        try:
            return self.infos[name]
        except KeyError:
            raise InputError(f"{self.path} has no tensor {name!r}", "check the tensor name") from None

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.info(name)
        t = self.reader(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None


def open_dense(path: str | os.PathLike) -> DenseModel:
    """The model at path (an HF directory, quantised or not, or any format a plugin reads); InputError if none."""
    from mlc.io.hfdir import is_model_dir, read_config
    from mlc.io.safetensors_reader import ModelTensors

    p = Path(path)
    if is_model_dir(p):
        config = read_config(p)
        tensors = ModelTensors(p)
        qconfig = config.get("quantization_config")
        if isinstance(qconfig, dict):
            return _dequantized(p, config, qconfig, tensors)
        return DenseModel(p, tensors.infos, tensors.read, config, p, "hf", tensors.close)
    return _from_format(p)


# The tensors that store one quantised Linear `<name>` in each layout (besides what replaces `<name>.weight`).
_STORAGE = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_codes", "weight_zero", "outlier_cols", "outlier_weight")


def _dequantized(path: Path, config: dict[str, Any], qconfig: dict[str, Any], tensors: Any) -> DenseModel:
    from mlc.io.quant_format import layer_specs, read_layer

    names = tensors.names()
    candidates = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith((".weight_packed", ".weight_codes", ".weight_scale"))})
    try:
        specs = layer_specs(qconfig, candidates)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unsupported quantization_config ({e})", "mlc reads compressed-tensors weight-only layouts and its own") from None
    # Dequantised in the dtype of the scales, as compressed-tensors does (its product rounds to that dtype).
    dtypes = {layer: tensors.info(f"{layer}.weight_scale").dtype for layer in specs}
    infos: dict[str, Any] = {}
    hidden = {f"{layer}.{suffix}" for layer in specs for suffix in (*_STORAGE, "weight")}
    for name in names:
        if name not in hidden:
            infos[name] = tensors.info(name)
    for layer, spec in specs.items():
        infos[f"{layer}.weight"] = DenseInfo(f"{layer}.weight", dtypes[layer], _dense_shape(tensors, layer, spec.kind))

    def read(name: str) -> torch.Tensor:
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in specs:
            return read_layer(layer, specs[layer], tensors.read).dequantize(torch.float32).to(dtypes[layer])
        return tensors.read(name)

    kinds = sorted({f"{s.kind}{s.bits if s.kind == 'int' else ''}" for s in specs.values()})
    source = f"{qconfig.get('quant_method')} {'/'.join(kinds) or 'no quantised layers'} (dequantised)"
    return DenseModel(path, infos, read, config, path, source, tensors.close, quantized=True)


def _dense_shape(tensors: Any, layer: str, kind: str) -> tuple[int, ...]:
    if kind == "int":
        return tuple(int(v) for v in tensors.read(f"{layer}.weight_shape").tolist())
    if kind == "codebook":
        n, half = tensors.info(f"{layer}.weight_codes").shape
        return (n, 2 * half)
    return tuple(tensors.info(f"{layer}.weight").shape)  # fp8 and llm_int8 keep [N, K]


def _from_format(path: Path) -> DenseModel:
    from mlc.io.formats import ConvertOptions, detect_format

    try:
        fmt = detect_format(path)
    except InputError as e:
        if path.is_dir() and not (path / "config.json").is_file():
            raise InputError(f"{path} is not a model directory: it has no config.json, and {e.message.split(' (')[0].replace(f' {path}', ' it')}",
                             "pass an HF model directory, a GGUF file, or a checkpoint `mlc checkpoint inspect` recognises") from None
        raise
    ckpt = fmt.open(path, ConvertOptions())
    if not ckpt.config:
        ckpt.close()
        raise InputError(f"{path} ({fmt.name}) carries no model config", "convert it to an HF directory with `mlc checkpoint convert --config`")
    infos = {e.name: DenseInfo(e.name, getattr(torch, e.dtype), tuple(e.shape)) for e in ckpt.tensors() if not e.is_optimizer}
    file_type = _gguf_file_type((ckpt.info or {}).get("file_type")) if fmt.name == "gguf" else None
    source = fmt.name + (f" {file_type}" if file_type else "") + (" (dequantised)" if fmt.name == "gguf" else "")
    return DenseModel(path, infos, ckpt.read, dict(ckpt.config), ckpt.assets, source, ckpt.close, quantized=fmt.name == "gguf")


def _gguf_file_type(code: Any) -> str | None:
    """llama.cpp's name for a GGUF general.file_type code ("Q4_1" for 3)."""
    try:
        from gguf import LlamaFileType

        return LlamaFileType(int(code)).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError, TypeError):
        return None if code is None else f"file type {code}"
