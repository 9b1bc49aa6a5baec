"""`torch`: one PyTorch state dict (.pt / .pth / .bin, or an HF directory of pytorch_model*.bin), weights only.

Reading uses `torch.load(weights_only=True, mmap=True)`: tensors stay in the page cache until read, and a
file that needs pickled code (a class, a function, argparse.Namespace) is refused rather than executed.
Writing needs the whole state dict in memory (torch.save cannot stream); use hf for large models.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError
from mlc.io.checkpoints.base import Opened, copy_assets, dtype_str, main_dtype, output_dtype, require_config, weights, write_config
from mlc.io.formats import ConvertOptions, TensorEntry
from mlc.io.hfdir import read_config

SUFFIXES = (".pt", ".pth", ".bin")
NESTED_KEYS = ("state_dict", "model", "module", "model_state_dict")
OUT_FILE = "pytorch_model.bin"


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise InputError(f"{path} is missing shard {missing[0]} named in {index.name}", "copy or re-download the missing file")
        return [path / n for n in names]
    return sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)


def load_weights_only(file: Path) -> Any:
    """torch.load with weights_only=True; pickled code becomes a one-line refusal naming the file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        needed = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the global {needed[1]}" if needed else "pickled Python objects"
        raise InputError(
            f"{file} needs {what} to load, and mlc loads torch files with weights_only=True only",
            "unpickling can run arbitrary code; if you trust the file, re-save its tensors (torch.save(state_dict)) or as safetensors",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{file} is not a readable PyTorch file ({str(e).splitlines()[0][:120]})", "the file is truncated or corrupt") from None


def state_dict_of(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict inside a loaded object (a bare state dict or one nested under a usual key)."""
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                return state_dict_of(obj[key], file)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and all(isinstance(k, str) for k in tensors):
            return tensors
    raise InputError(f"{file} holds no state dict of named tensors", f"found {type(obj).__name__}; save model.state_dict()")


def release_pages(t: torch.Tensor) -> None:
    """Drop the memory-mapped file pages under t (read again from the file if touched).

    torch.load(mmap=True) maps the file privately: every page read stays in the process (4.4 GB of RSS after
    converting a 4.1 GB file) until unmapped. MADV_DONTNEED on the clean pages frees them at once.
    """
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_DONTNEED") or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.untyped_storage().data_ptr() // page * page
    end = t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()
    try:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
    except (OSError, AttributeError):
        pass  # only memory is at stake


class TorchFormat:
    name = "torch"
    description = "PyTorch state dict (.pt/.pth/.bin), loaded with weights_only=True (pickled code is refused)"

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix in SUFFIXES
        return path.is_dir() and not any(path.glob("*.safetensors")) and (
            (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file()
        )

    def open(self, path: Path, options: ConvertOptions) -> Opened:
        from mlc.io.checkpoints.base import given_config

        files = _files(path)
        if not files:
            raise InputError(f"{path} holds no .pt, .pth or .bin file", "pass the state dict file")
        tensors: dict[str, torch.Tensor] = {}
        mapped: set[str] = set()  # only pages of a file mapping may be dropped (anonymous ones would read back as zeros)
        for f in files:
            for name, t in state_dict_of(load_weights_only(f), f).items():
                tensors[name.removeprefix("module.")] = t
                if zipfile.is_zipfile(f):
                    mapped.add(name.removeprefix("module."))
        entries = [TensorEntry(n, dtype_str(t.dtype), tuple(t.shape)) for n, t in tensors.items()]

        def read(name: str) -> torch.Tensor:
            t = tensors[name]
            out = t.clone()
            if name in mapped:
                release_pages(t)
            return out

        config, assets = given_config(options)
        if config is None and path.is_dir() and (path / "config.json").is_file():
            config, assets = read_config(path), path
        return Opened("torch", path, entries, read, config, assets, {"files": len(files)}, tensors.clear)

    def write(self, ckpt: Opened, out_dir: Path, options: ConvertOptions) -> None:
        config = require_config(ckpt, "a model directory") if ckpt.config is not None or ckpt.assets else ckpt.config
        entries = [e for e in weights(ckpt, options) if not e.is_optimizer]
        state = {e.name: ckpt.read(e.name).to(output_dtype(e, options)).contiguous() for e in entries}
        torch.save(state, out_dir / OUT_FILE)
        if config is not None:
            write_config(out_dir, config, main_dtype(entries, options))
            copy_assets(ckpt, out_dir)


TORCH = TorchFormat()
