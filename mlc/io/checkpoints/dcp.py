"""`dcp`: torch.distributed.checkpoint directories as `mlc train` writes them (any world size), read and written.

    <run>/checkpoints/step-00000040/   .metadata + __<rank>_0.distcp, trainer.json, rng-rank<r>.pt, COMPLETE

Keys are `train.model.<fqn>` (HF names) and `train.optim.state.<fqn>.<state>`; a parameter saved on N ranks is
N chunks, which reading stitches back whole. Reading is mlc's own (about 60 lines) rather than `dcp.load`
for three reasons: `.metadata` is a pickle, which mlc unpickles allowing only DCP's own metadata classes (torch
runs any code in it); each chunk is read with `torch.load(weights_only=True)`; and a missing or truncated
shard file is named in a one-line error. Writing goes through `dcp.save` itself, with a planner that reads
each tensor from the source only when the writer asks for it, so memory holds one tensor at a time.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError
from mlc.io.atomic import atomic_write_json
from mlc.io.checkpoints.base import Opened, dtype_str, given_config, output_dtype, weights
from mlc.io.formats import OPTIM_SEP, ConvertOptions, TensorEntry
from mlc.io.hfdir import read_config

MARKER = "COMPLETE"
METADATA = ".metadata"
STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_PREFIX = "train.model."
OPTIM_PREFIX = "train.optim.state."
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()) or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


def read_metadata(step: Path) -> Any:
    """DCP's Metadata object, unpickled with only DCP's own classes allowed."""
    file = step / METADATA
    if not file.is_file():
        raise InputError(f"{step} has no {METADATA} file", "it is not a DCP checkpoint, or its save did not finish")
    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise InputError(f"{file} is not readable DCP metadata ({e})", "the file is truncated or corrupt") from None


def is_step_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


def complete_steps(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete steps under a checkpoints directory, oldest first."""
    found = []
    if checkpoints.is_dir():
        for p in checkpoints.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / MARKER).is_file():
                found.append((int(m[1]), p))
    return sorted(found)


def step_dir_of(path: Path) -> Path:
    """The step directory meant by a step directory or a run directory (its latest complete step)."""
    if is_step_dir(path):
        return path
    for checkpoints in (path / "checkpoints", path):
        steps = complete_steps(checkpoints)
        if steps:
            return steps[-1][1]
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        raise InputError(f"{path} holds no complete checkpoint step", "train with checkpoint.interval set, or pass a step directory")
    from mlc.io.formats import describe_path

    raise InputError(f"{path} is not a DCP checkpoint: no {METADATA} file ({describe_path(path)})", "pass a step directory like runs/<id>/checkpoints/step-00000040, a run directory or run:<id>")


def run_dir_of(step: Path) -> Path | None:
    run = step.parent.parent
    return run if (run / "run.json").is_file() else None


def model_files_of_run(run: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """(config.json, tokenizer directory) of the model a train run trained, from its run.json."""
    data = json.loads((run / "run.json").read_text())
    model = data.get("config", {}).get("model", {})
    init = next((i["path"] for i in data.get("inputs", []) if i.get("role") == "init"), None)
    source = Path(init) if init else Path(model["config"]) if model.get("config") else None
    if source is None or not source.exists():
        return None, None
    config = read_config(source)
    tokenizer = Path(model["tokenizer"]) if model.get("tokenizer") else (source if source.is_dir() else source.parent)
    return config, tokenizer


def _split_optim(key: str, params: set[str]) -> str | None:
    """`train.optim.state.<fqn>.<state>` -> `<fqn>/<state>` (fqn one of the model's parameters)."""
    rest = key[len(OPTIM_PREFIX):]
    fqn, _, state = rest.rpartition(".")
    return f"{fqn}{OPTIM_SEP}{state}" if fqn in params else None


class DCPReader:
    """The tensors of one DCP step directory, each read whole from its chunks."""

    def __init__(self, step: Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.step = step
        self.meta = read_metadata(step)
        self.tensor_meta = {k: v for k, v in self.meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self.check_files()

    def check_files(self) -> None:
        """Every shard file the metadata names exists and is long enough: a missing or cut file fails before any work."""
        ends: dict[str, int] = {}
        for info in self.meta.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(ends.items()):
            file = self.step / name
            if not file.is_file():
                raise InputError(f"{file} is missing", "a shard of this checkpoint was deleted or never written; use another step")
            if file.stat().st_size < end:
                raise InputError(f"{file} is truncated: {file.stat().st_size} bytes, its tensors end at byte {end}", "use another step, or re-copy the checkpoint")

    def files(self) -> set[str]:
        return {info.relative_path for info in self.meta.storage_data.values()}

    def read_key(self, key: str) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        md = self.tensor_meta[key]
        whole = None
        for chunk in md.chunks:
            info = self.meta.storage_data[MetadataIndex(key, chunk.offsets)]
            if getattr(info, "transform_descriptors", None):
                raise InputError(f"{self.step / info.relative_path}: tensor {key!r} is stored transformed ({info.transform_descriptors})", "mlc reads uncompressed DCP checkpoints")
            part = self._load_chunk(self.step / info.relative_path, info.offset, info.length, key)
            if tuple(part.shape) != tuple(chunk.sizes):
                raise InputError(f"{self.step / info.relative_path}: chunk of {key!r} has shape {tuple(part.shape)}, metadata says {tuple(chunk.sizes)}", "the checkpoint is corrupt")
            if len(md.chunks) == 1 and tuple(chunk.sizes) == tuple(md.size):
                return part  # saved on one process: the chunk is the tensor (no second copy)
            if whole is None:
                whole = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            whole[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = part
            del part
        return whole if whole is not None else torch.empty(tuple(md.size), dtype=md.properties.dtype)

    @staticmethod
    def _load_chunk(file: Path, offset: int, length: int, key: str) -> torch.Tensor:
        if not file.is_file():
            raise InputError(f"{file} is missing (it holds tensor {key!r})", "a shard of this checkpoint was deleted or never written; use another step")
        size = file.stat().st_size
        if offset + length > size:
            raise InputError(f"{file} is truncated: {size} bytes, but tensor {key!r} ends at byte {offset + length}", "use another step, or re-copy the checkpoint")
        with open(file, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        try:
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch reports a damaged zip record in several exception types
            raise InputError(f"{file}: tensor {key!r} is corrupt ({str(e).splitlines()[0][:100]})", "the file was damaged; use another step") from None


class DCPFormat:
    name = "dcp"
    description = "torch.distributed.checkpoint step directory of mlc train (any world size; a run dir means its latest step)"

    def detect(self, path: Path) -> bool:
        return is_step_dir(path) or (path.is_dir() and bool(complete_steps(path / "checkpoints")))

    def open(self, path: Path, options: ConvertOptions) -> Opened:
        step = step_dir_of(path)
        reader = DCPReader(step)
        keys = reader.tensor_meta
        model = {k[len(MODEL_PREFIX):]: k for k in keys if k.startswith(MODEL_PREFIX)}
        if not any(k.startswith("train.") for k in keys):
            model = dict(zip(keys, keys))  # a plain DCP state dict (not mlc train's): its keys as they are
        if any(".lora_" in n for n in model):
            raise InputError(f"{step} is a LoRA run's checkpoint: it holds adapter weights only", "convert the run's adapter artifact, or merge it with `mlc merge`")
        names = dict(model)
        optim = [k for k in keys if k.startswith(OPTIM_PREFIX)]
        for key in optim:
            split = _split_optim(key, set(model))
            if split is not None:
                names[split] = key
        entries = []
        for name, key in names.items():
            md = keys[key]
            entries.append(TensorEntry(name, dtype_str(md.properties.dtype), tuple(md.size)))
        info = self._info(step, reader, bool(optim))
        config, assets = given_config(options)
        if config is None and (step / "config.json").is_file():  # written by `mlc checkpoint convert --to dcp`
            config, assets = read_config(step), step
        if config is None and run_dir_of(step) is not None:  # written by `mlc train`: the run knows its model
            config, assets = model_files_of_run(run_dir_of(step))
        return Opened("dcp", step, entries, lambda n: reader.read_key(names[n]), config, assets, info)

    @staticmethod
    def _info(step: Path, reader: DCPReader, has_optim: bool) -> dict[str, Any]:
        info: dict[str, Any] = {"step_dir": str(step), "complete": (step / MARKER).is_file(), "optimizer": has_optim}
        trainer = step / "trainer.json"
        if trainer.is_file():
            data = json.loads(trainer.read_text())
            info.update(step=data.get("step"), world_size=data.get("world_size"), tokens=data.get("tokens"))
        else:
            m = STEP_DIR.match(step.name)
            info["step"] = int(m[1]) if m else None
            info["world_size"] = len({f for f in reader.files() if f.endswith(".distcp")}) or None
        return info

    def write(self, ckpt: Any, out_dir: Path, options: ConvertOptions) -> None:
        """A step directory loadable by `dcp.load` at any world size, with trainer.json and COMPLETE."""
        import torch.distributed.checkpoint as dcp

        entries = weights(ckpt, options)
        keys: dict[str, TensorEntry] = {}
        for e in entries:
            if e.is_optimizer:
                fqn, state = e.name.split(OPTIM_SEP)
                keys[f"{OPTIM_PREFIX}{fqn}.{state}"] = e
            else:
                keys[MODEL_PREFIX + e.name] = e
        state = {k: torch.empty(e.shape, dtype=output_dtype(e, options), device="meta") for k, e in keys.items()}
        planner = _LazySavePlanner(lambda key: ckpt.read(keys[key].name).to(output_dtype(keys[key], options)))
        # One file per tensor: torch's writer keeps every tensor of a file alive until the file closes.
        writer = dcp.FileSystemWriter(str(out_dir), single_file_per_rank=False, thread_count=1, sync_files=True)
        with warnings.catch_warnings():  # one process writes without a process group, as intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
        step = ckpt.info.get("step")
        atomic_write_json(out_dir / "trainer.json", {"step": step, "world_size": 1, "source": f"{ckpt.format}:{ckpt.path}"})
        if ckpt.config is not None:  # so the step converts back to hf without its run directory
            (out_dir / "config.json").write_text(json.dumps(ckpt.config, indent=2, sort_keys=True) + "\n")
        from mlc.io.checkpoints.base import copy_assets

        copy_assets(ckpt, out_dir)
        atomic_write_json(out_dir / MARKER, {"step": step, "world_size": 1})


def _lazy_planner_class() -> type:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class LazySavePlanner(DefaultSavePlanner):
        """Plans from meta tensors; each real tensor is read from the source when the writer reaches it."""

        def __init__(self, read: Any):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self._read = read

        def lookup_object(self, index: Any) -> Any:
            return self._read(index.fqn)

    return LazySavePlanner


def _LazySavePlanner(read: Any) -> Any:
    return _lazy_planner_class()(read)


DCP = DCPFormat()



def damaged_chunks(step: Path) -> list[str]:
    """One line per stored chunk whose bytes changed since it was written.

    Each chunk is a torch.save zip archive whose records carry CRC-32s that torch.load never checks; zipfile's
    testzip does, so a flipped byte anywhere in a tensor's data is found without a separate hash manifest.
    """
    import zipfile

    reader = DCPReader(step)
    problems = []
    for index, info in sorted(reader.meta.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        with open(step / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            bad = zipfile.ZipFile(io.BytesIO(raw)).testzip()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            bad = str(e) or e.__class__.__name__
        if bad is not None:
            problems.append(f"{step / info.relative_path}: the bytes of tensor {index.fqn!r} changed since they were written (CRC-32 mismatch in {bad})")
    return problems
