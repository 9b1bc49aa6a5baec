"""The `gguf` checkpoint format: detect GGUF files and convert them to Hugging Face directories."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlc.errors import InputError

MAGIC = b"GGUF"


class GGUFFormat:
    name = "gguf"
    description = "llama.cpp GGUF file (dequantised on read; llama, qwen2, qwen2moe architectures)"

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == MAGIC

    def to_hf(self, src: Path, out_dir: Path, dtype: torch.dtype | None = None) -> None:
        """Write config.json, model.safetensors, tokenizer files and generation_config.json into out_dir."""
        from gguf import GGUFReader

        from mlc.io.hfdir import write_config
        from mlc.io.safetensors_writer import PlannedTensor, ShardedWriter
        from mlc.models.config import config_from_hf, dtype_name
        from mlc_gguf.tokenizer import build_tokenizer
        from mlc_gguf.weights import GGUFModel

        if not self.detect(src):
            raise InputError(f"{src} is not a GGUF file", "its first bytes are not the GGUF magic")
        try:
            reader = GGUFReader(src)
        except (ValueError, OSError) as e:
            raise InputError(f"{src} is not a readable GGUF file ({e})", "the file is truncated or corrupt") from None
        model = GGUFModel(reader, str(src))
        dtype = dtype or torch.float32
        # Validating through mlc's own config reader makes sure the output is a model mlc can load.
        config = config_from_hf(model.config).with_updates(torch_dtype=dtype_name(dtype)).to_hf()
        tokenizer, tokenizer_config = build_tokenizer(reader, str(src))
        tensors = list(model.hf_tensors())
        plan = [PlannedTensor(t.name, dtype, t.shape) for t in tensors]
        with ShardedWriter(out_dir, plan, metadata={"source": f"gguf:{src.name}"}) as writer:
            for t in tensors:
                writer.write(t.name, t.read().to(dtype))
        write_config(out_dir, config)
        tokenizer.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
        special = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in tokenizer_config}
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


GGUF = GGUFFormat()
