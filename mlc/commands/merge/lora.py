"""LoRA adapters: fold PEFT adapters into a base (combining several with a merge method), and extract one.

Folding streams the base one tensor at a time: W' = W + s * B @ A for Linear targets (transposed with
fan_in_fan_out), W' = W + s * (B @ A)^T for Embedding targets, with s = alpha / r (alpha / sqrt(r)
with rslora; rank_pattern / alpha_pattern per module as PEFT matches them). modules_to_save replace
their tensors whole. With several adapters, each gives a candidate W + delta_i and a merge method
(linear, ties, dare_ties, ...) combines the candidates against the base W before the result is written.

Extraction takes the truncated SVD of each 2-D delta (tuned - base): B = U_r S_r, A = V_r^T with
lora_alpha = r (scale 1), written as a PEFT adapter that `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from mlc.commands.merge.executor import return_freed_memory_to_os
from mlc.contracts import MergeMethod
from mlc.errors import InputError, ValidationError
from mlc.io.hfdir import copy_tokenizer_files, read_config, write_config
from mlc.io.peft import ADAPTER_WEIGHTS, PREFIX, PeftAdapter, read_adapter
from mlc.io.safetensors_reader import ModelTensors
from mlc.io.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from mlc.rng import keyed_generator


def open_adapter(path: Path, base: ModelTensors, problems: list[str]) -> PeftAdapter | None:
    """Read and check an adapter against its base; problems are appended, None if unusable."""
    try:
        adapter = read_adapter(path)
    except InputError as e:
        problems.append(e.message)
        return None
    problems.extend(adapter.problems())
    for name in sorted(adapter.targets()):
        if name not in base:
            problems.append(f"{path}: targets {name}, which the base model does not have")
            continue
        shape, got = tuple(base.info(name).shape), adapter.shape_of_delta(name)
        if got != shape:
            problems.append(f"{path}: the delta for {name} has shape {list(got)}, the base tensor {list(shape)}")
    return adapter


def fold(
    base_dir: Path,
    adapter_dirs: list[Path],
    out_dir: Path,
    method: MergeMethod | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_tensor: Callable[[str], None] | None = None,
) -> int:
    """Fold adapters into the base, writing an HF directory into out_dir; return how many tensors changed."""
    adapters, bound, base = check_fold(base_dir, adapter_dirs, method, params)
    return_freed_memory_to_os()
    names = base.names()
    out_dtypes = {n: (dtype if dtype is not None and base.info(n).dtype.is_floating_point else base.info(n).dtype) for n in names}
    changed = 0
    with ShardedWriter(out_dir, [(n, out_dtypes[n], base.info(n).shape) for n in names], max_shard_bytes) as writer:
        for name in names:
            w = base.read(name)
            touching = [a for a in adapters if name in a.targets()]
            if touching:
                changed += 1
                w = _fold_one(name, w, adapters, method, bound, seed)
            writer.write(name, w.to(out_dtypes[name]))
            del w
            if on_tensor is not None:
                on_tensor(name)
    config = read_config(base_dir)
    if dtype is not None:
        for k in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[k] = str(dtype).removeprefix("torch.")
    write_config(out_dir, config)
    copy_tokenizer_files(base_dir, out_dir)
    return changed


def check_fold(base_dir: Path, adapter_dirs: list[Path], method: MergeMethod | None, params: dict[str, Any] | None) -> tuple[list[PeftAdapter], dict[str, Any], ModelTensors]:
    """Validate the base, the adapters and the combining method before any weight is read."""
    problems: list[str] = []
    from mlc.io.hfdir import require_model_dir

    try:
        base = ModelTensors(require_model_dir(base_dir))
    except InputError as e:
        raise ValidationError([e.message], what="LoRA fold") from None
    adapters = [a for a in (open_adapter(Path(p), base, problems) for p in adapter_dirs) if a is not None]
    bound: dict[str, Any] = {}
    if len(adapter_dirs) > 1 and method is None:
        problems.append("several adapters need --method to combine them (e.g. linear, ties, dare_ties)")
    if method is not None:
        why = method.count_problem(len(adapter_dirs), method.takes_base)
        if why:
            problems.append(why)
        try:
            bound = method.bind(params or {}, len(adapter_dirs))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValidationError(problems, what="LoRA fold")
    return adapters, bound, base


def _fold_one(name: str, w: torch.Tensor, adapters: list[PeftAdapter], method: MergeMethod | None, params: dict[str, Any], seed: int) -> torch.Tensor:
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    base = w.to(work)
    candidates = []
    for a in adapters:
        start = a.tensors.read(a.replaced[name], work) if name in a.replaced else base
        d = a.delta(name, work)
        candidates.append(start + d if d is not None else start.clone())
    if method is None:
        return candidates[0]
    rng = keyed_generator(seed, name) if method.random else None
    if method.takes_base:
        return method.fn(candidates, base, params, rng)
    return method.fn(candidates, None, params, rng)


def extract(
    base_dir: Path,
    tuned_dir: Path,
    out_dir: Path,
    rank: int,
    dtype: torch.dtype = torch.float32,
    include_embeddings: bool = True,
    min_delta: float = 0.0,
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a PEFT LoRA adapter approximating tuned - base with rank `rank`; return a report per tensor."""
    from mlc.io.hfdir import require_model_dir

    problems = []
    try:
        base = ModelTensors(require_model_dir(base_dir))
        tuned = ModelTensors(require_model_dir(tuned_dir))
    except InputError as e:
        raise ValidationError([e.message], what="LoRA extraction") from None
    if rank < 1:
        problems.append(f"--rank must be at least 1, got {rank}")
    missing = [n for n in base.names() if n not in tuned]
    if missing:
        problems.append(f"{tuned_dir} lacks {len(missing)} tensors of the base (first: {missing[0]})")
    for n in base.names():
        if n in tuned and base.info(n).shape != tuned.info(n).shape:
            problems.append(f"{n}: base {list(base.info(n).shape)} vs tuned {list(tuned.info(n).shape)}")
    if problems:
        raise ValidationError(problems, what="LoRA extraction")
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"tensors": {}, "not_representable": {}}
    targets = []
    low_rank: dict[str, int] = {}  # modules too small for the requested rank
    for name in base.names():
        w0, w1 = base.read(name, torch.float32), tuned.read(name, torch.float32)
        delta = w1 - w0
        del w0, w1
        size = float(delta.abs().max()) if delta.numel() else 0.0
        if size <= min_delta:
            continue
        module = name.removesuffix(".weight")
        is_embedding = "embed" in name or "wte" in name
        if delta.dim() != 2 or not name.endswith(".weight") or (is_embedding and not include_embeddings):
            report["not_representable"][name] = size  # norms, biases: a LoRA cannot carry them
            continue
        # Embedding deltas are stored transposed (lora_embedding_A: r x vocab), Linear ones as is.
        target = delta.T if is_embedding else delta
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        r = min(rank, s.numel())
        b, a = (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()
        err = float((target - b @ a).norm() / target.norm().clamp_min(1e-30))
        report["tensors"][name] = {"rank": r, "relative_error": err}
        key_a, key_b = ("lora_embedding_A", "lora_embedding_B") if is_embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{module}.{key_a}"] = a.to(dtype)
        tensors[f"{PREFIX}{module}.{key_b}"] = b.to(dtype)
        targets.append(module)
        if r < rank:
            low_rank[re.escape(module)] = r
        if on_tensor is not None:
            on_tensor(name)
    if not targets:
        raise ValidationError([f"{tuned_dir} does not differ from {base_dir} in any 2-D weight"], what="LoRA extraction")
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_dir).absolute()),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "target_modules": sorted(targets),
        "rank_pattern": low_rank,
        "alpha_pattern": low_rank,  # alpha = r everywhere: every delta is B @ A, scale 1
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return report
