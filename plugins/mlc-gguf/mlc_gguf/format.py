"""The `gguf` checkpoint format: read GGUF files (dequantised, HF names) and write them (mlc_gguf.export)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError

MAGIC = b"GGUF"
OUT_FILE = "model.gguf"


def gguf_file(path: Path) -> Path | None:
    """path itself, or the one .gguf file in a directory (what `convert --to gguf` writes)."""
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        return files[0] if len(files) == 1 else None
    return path


def open_reader(src: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(src)
    except (ValueError, OSError, IndexError, KeyError, TypeError, UnicodeDecodeError) as e:
        # gguf-py raises whatever numpy raises when a length or an offset points past the end of the file.
        what = str(e).splitlines()[0][:100] if str(e) else e.__class__.__name__
        raise InputError(f"{src} is not a readable GGUF file: {what}", "the file is truncated or corrupt after its header") from None


class GGUFFormat:
    name = "gguf"
    description = "llama.cpp GGUF file (dequantised on read; llama, qwen2, qwen2moe architectures)"

    def detect(self, path: Path) -> bool:
        file = gguf_file(path)
        if file is None or not file.is_file():
            return False
        with open(file, "rb") as f:
            return f.read(4) == MAGIC

    def open(self, path: Path, options: Any) -> Any:
        """The GGUF's tensors under HF names (float32, dequantised), its config, and a rebuilt tokenizer as assets."""
        from mlc.io.checkpoints.base import Opened
        from mlc.io.formats import TensorEntry
        from mlc_gguf.tokenizer import build_tokenizer
        from mlc_gguf.weights import GGUFModel

        src = gguf_file(path)
        if src is None or not self.detect(path):
            raise InputError(f"{path} is not a GGUF file", "its first bytes are not the GGUF magic")
        reader = open_reader(src)
        try:
            model = GGUFModel(reader, str(src))
            tensors = {t.name: t for t in model.hf_tensors()}
        except (ValueError, IndexError, KeyError, TypeError) as e:
            raise InputError(f"{src} is not a readable GGUF file: {e.__class__.__name__}: {str(e)[:80]}", "the file is truncated or corrupt") from None
        assets = Path(tempfile.mkdtemp(prefix="mlc-gguf-tokenizer-"))
        tokenizer, tokenizer_config = build_tokenizer(reader, str(src))
        write_tokenizer_files(assets, tokenizer, tokenizer_config, model.config)
        entries = [TensorEntry(n, "float32", t.shape) for n, t in tensors.items()]

        def close() -> None:
            import shutil

            shutil.rmtree(assets, ignore_errors=True)

        info = {"file_type": str(reader.fields["general.file_type"].contents()) if "general.file_type" in reader.fields else None}
        from mlc.models.config import config_from_hf

        config = config_from_hf(model.config).to_hf()
        return Opened("gguf", src, entries, lambda n: tensors[n].read(), config, assets, info, close)

    def write(self, ckpt: Any, out_dir: Path, options: Any) -> None:
        """out_dir/model.gguf, in options.quant (default F16); options.extra["int_weights"], ["progress"]: see write_gguf."""
        from mlc_gguf.export import write_gguf

        write_gguf(ckpt, out_dir / OUT_FILE, options.quant or "F16", options.extra.get("int_weights"), options.extra.get("progress"))

    def to_hf(self, src: Path, out_dir: Path, dtype: torch.dtype | None = None) -> None:
        """Write config.json, model.safetensors, tokenizer files and generation_config.json into out_dir."""
        from mlc.io.hfdir import write_config
        from mlc.io.safetensors_writer import PlannedTensor, ShardedWriter
        from mlc.models.config import config_from_hf, dtype_name
        from mlc_gguf.tokenizer import build_tokenizer
        from mlc_gguf.weights import GGUFModel

        if not self.detect(src):
            raise InputError(f"{src} is not a GGUF file", "its first bytes are not the GGUF magic")
        src = gguf_file(src)
        reader = open_reader(src)
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
        write_tokenizer_files(out_dir, tokenizer, tokenizer_config, config)


def write_tokenizer_files(out_dir: Path, tokenizer: Any, tokenizer_config: dict[str, Any], config: dict[str, Any]) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    special = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in tokenizer_config}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


GGUF = GGUFFormat()
