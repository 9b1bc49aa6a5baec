"""`universal`: one file per parameter, each whole, with its optimizer state (DeepSpeed's Universal Checkpointing idea).

    <dir>/universal.json                    format, version, step, source, and per parameter: dtype, shape, file,
                                            the optimizer states it holds
    <dir>/params/<hf name>.safetensors      "weight" and, when kept, "exp_avg", "exp_avg_sq", "step", ...
    <dir>/config.json, tokenizer files      the model, so the layout converts to hf, dcp or gguf on its own

Any parallel layout is one cut of these whole tensors: `--to dcp` (DCP re-shards on load to any world size) or
`--to tp --spec S --tp N` (a tensor-parallel layout written from the spec). Files are safetensors rather than
DeepSpeed's torch.save pickles, so reading one runs no code and touches only that parameter's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlc.errors import InputError
from mlc.io.checkpoints.base import Opened, copy_assets, given_config, output_dtype, weights, write_config
from mlc.io.formats import OPTIM_SEP, ConvertOptions, TensorEntry
from mlc.io.hfdir import read_config

INDEX = "universal.json"
LAYOUT = "mlc-universal"
VERSION = 1


class UniversalFormat:
    name = "universal"
    description = "per-parameter layout: each parameter whole with its optimizer state, loadable at any world size or TP layout"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / INDEX).is_file()

    def open(self, path: Path, options: ConvertOptions) -> Opened:
        from mlc.io.safetensors_reader import SafetensorsFile

        try:
            index = json.loads((path / INDEX).read_text())
            params: dict[str, Any] = index["params"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path / INDEX} is not a universal checkpoint index ({e.__class__.__name__})", "the file is corrupt") from None
        if index.get("format") != LAYOUT or index.get("version") != VERSION:
            raise InputError(f"{path / INDEX} is not an {LAYOUT} v{VERSION} index", "convert it again with this mlc")
        entries, where = [], {}
        for name, p in params.items():
            entries.append(TensorEntry(name, p["dtype"], tuple(p["shape"])))
            where[name] = (p["file"], "weight")
            for state, s in p.get("optimizer", {}).items():
                entries.append(TensorEntry(f"{name}{OPTIM_SEP}{state}", s["dtype"], tuple(s["shape"])))
                where[f"{name}{OPTIM_SEP}{state}"] = (p["file"], state)

        def read(name: str) -> Any:
            file, key = where[name]
            sf = SafetensorsFile(path / file)  # checks the header against the file size: truncation is named
            try:
                if key not in sf.tensors:
                    raise InputError(f"{path / file} has no tensor {key!r}", "the checkpoint is corrupt")
                return sf.read(key)
            finally:
                sf.close()

        config, assets = given_config(options)
        if config is None and (path / "config.json").is_file():
            config, assets = read_config(path), path
        info = {k: index.get(k) for k in ("step", "source", "world_size")} | {"optimizer": any(e.is_optimizer for e in entries)}
        return Opened("universal", path, entries, read, config, assets, info)

    def write(self, ckpt: Any, out_dir: Path, options: ConvertOptions) -> None:
        from safetensors.torch import save_file

        entries = weights(ckpt, options)
        states: dict[str, list[TensorEntry]] = {}
        for e in entries:
            if e.is_optimizer:
                states.setdefault(e.name.split(OPTIM_SEP)[0], []).append(e)
        (out_dir / "params").mkdir()
        params: dict[str, Any] = {}
        for e in entries:
            if e.is_optimizer:
                continue
            file = f"params/{e.name}.safetensors"
            tensors = {"weight": ckpt.read(e.name).to(output_dtype(e, options)).contiguous()}
            optimizer = {}
            for s in states.get(e.name, []):
                key = s.name.split(OPTIM_SEP)[1]
                tensors[key] = ckpt.read(s.name).contiguous()
                optimizer[key] = {"dtype": s.dtype, "shape": list(s.shape)}
            save_file(tensors, str(out_dir / file))
            params[e.name] = {"dtype": str(tensors["weight"].dtype).removeprefix("torch."), "shape": list(e.shape), "file": file, "optimizer": optimizer}
            del tensors
        index = {
            "format": LAYOUT, "version": VERSION, "step": ckpt.info.get("step"), "world_size": ckpt.info.get("world_size"),
            "source": f"{ckpt.format}:{ckpt.path}", "params": params,
        }
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if ckpt.config is not None:
            write_config(out_dir, ckpt.config, None)
            copy_assets(ckpt, out_dir)


UNIVERSAL = UniversalFormat()
