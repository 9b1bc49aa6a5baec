"""`hf`: a Hugging Face model directory (safetensors, sharded with model.safetensors.index.json when large)."""

from __future__ import annotations

from pathlib import Path

from mlc.errors import InputError
from mlc.io.checkpoints.base import Opened, copy_assets, dtype_str, main_dtype, output_dtype, require_config, weights, write_config
from mlc.io.formats import ConvertOptions, TensorEntry
from mlc.io.hfdir import read_config


class HFFormat:
    name = "hf"
    description = "Hugging Face model directory: config.json + safetensors (sharded with an index), tokenizer"

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix == ".safetensors"
        return path.is_dir() and (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
        )

    def open(self, path: Path, options: ConvertOptions) -> Opened:
        from mlc.io.safetensors_reader import ModelTensors

        if path.is_dir() and not (path / "config.json").is_file():
            raise InputError(f"{path} is not an HF model directory: it has no config.json", "pass the directory holding config.json and *.safetensors")
        tensors = ModelTensors(path)  # validates every header, the index and that no shard is missing
        entries = [TensorEntry(i.name, dtype_str(i.dtype), i.shape) for i in tensors.infos.values()]
        config = read_config(path) if path.is_dir() else None
        info = {"files": len(tensors.files)}
        return Opened("hf", path, entries, tensors.read, config, path if path.is_dir() else None, info, tensors.close)

    def write(self, ckpt: Opened, out_dir: Path, options: ConvertOptions) -> None:
        from mlc.io.safetensors_writer import PlannedTensor, ShardedWriter

        config = require_config(ckpt, "an HF directory")
        entries = [e for e in weights(ckpt, options) if not e.is_optimizer]
        if config.get("tie_word_embeddings") and any(e.name == "model.embed_tokens.weight" for e in entries):
            entries = [e for e in entries if e.name != "lm_head.weight"]  # tied: transformers never stores it
        plan = [PlannedTensor(e.name, output_dtype(e, options), e.shape) for e in entries]
        with ShardedWriter(out_dir, plan, options.max_shard_bytes, metadata={"source": f"{ckpt.format}:{ckpt.path.name}"}) as writer:
            for e in entries:
                writer.write(e.name, ckpt.read(e.name))
        write_config(out_dir, config, main_dtype(entries, options))
        copy_assets(ckpt, out_dir)


HF = HFFormat()
