"""Merging from Python: a whole merge (`run_merge`), a plan without the work (`plan_merge`), one tensor (`merge_tensors`)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from mlc import plugins
from mlc.commands.merge.config import MergeConfig, load_yaml, parse_config
from mlc.commands.merge.executor import execute
from mlc.commands.merge.plan import Job, MergePlan, build_plan
from mlc.contracts import MergeMethod
from mlc.errors import MlcError, ValidationError
from mlc.io.hfdir import write_config
from mlc.io.safetensors_writer import DEFAULT_MAX_SHARD_BYTES


@dataclass
class MergeResult:
    out: Path
    files: list[str]
    tensors: int
    run_id: str | None
    warnings: list[str]


def load_config(config: str | os.PathLike | Mapping[str, Any] | MergeConfig) -> tuple[MergeConfig, str, list[str]]:
    """A parsed config, its text, and the structural problems found in it (a YAML path, a mapping or a MergeConfig)."""
    if isinstance(config, MergeConfig):
        return config, yaml.safe_dump(config.to_dict(), sort_keys=False), []
    if isinstance(config, Mapping):
        data, text = dict(config), yaml.safe_dump(dict(config), sort_keys=False)
    else:
        data, text = load_yaml(config)
    parsed, problems = parse_config(data)
    return parsed, text, problems


def plan_merge(
    config: str | os.PathLike | Mapping[str, Any] | MergeConfig,
    runs_root: str | os.PathLike | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> MergePlan:
    """Validate a merge completely (reading no weights) and return its plan; ValidationError lists every problem."""
    from mlc import options

    parsed, _, problems = load_config(config)
    root = Path(runs_root) if runs_root is not None else options.get().runs_dir
    if out is not None and Path(out).exists() and not overwrite:
        problems.append(f"output {out} already exists (pass --overwrite to replace it)")
    elif out is not None and (why := unwritable(Path(out))) is not None:
        problems.append(why)
    try:
        plan = build_plan(parsed, root, dict(parameters or {}), seed)
    except ValidationError as e:
        raise ValidationError(list(dict.fromkeys(problems + e.problems)), what="merge config") from None
    if problems:
        raise ValidationError(problems, what="merge config")
    return plan


def unwritable(out: Path) -> str | None:
    """Why the directory `out` cannot be written (its nearest existing parent refuses a file), or None."""
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".mlc-write-test-")
    except OSError as e:
        return f"cannot write the output {out}: {parent} refuses new files ({e.strerror or e.__class__.__name__})"
    os.close(fd)
    os.unlink(probe)
    return None


def write_model(plan: MergePlan, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, on_done: Callable[[Job], None] | None = None, config_text: str | None = None) -> list[str]:
    """Stream the merged weights, config, tokenizer and chat template into out_dir (which must exist)."""
    from mlc.commands.merge import tokenizer
    from mlc.io.hfdir import SIDE_FILES

    files = execute(plan, out_dir, max_shard_bytes=max_shard_bytes, on_done=on_done)
    write_config(out_dir, plan.out_config)
    files += ["config.json"] + tokenizer.write_tokenizer(plan, out_dir)
    tokenizer.set_chat_template(plan, out_dir)
    for name in SIDE_FILES:
        if Path(out_dir, name).is_file() and name not in files:
            files.append(name)
    if config_text is not None:
        Path(out_dir, "merge_config.yml").write_text(config_text)
        files.append("merge_config.yml")
    return files


def resolved_config(plan: MergePlan) -> dict[str, Any]:
    """The config with every model reference resolved to its path, plus what mlc added (seed, warnings)."""
    paths = {m.ref: str(m.path) for m in plan.models}
    data = json.loads(json.dumps(plan.config.to_dict(), default=str))

    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (paths.get(v, v) if k in ("model", "base_model", "tokenizer_source", "source") and isinstance(v, str) else sub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        return node

    return {
        **sub(data), "seed": plan.seed, "method_defaults": {p.name: p.default for p in plan.method.params if not p.required},
        "inputs": {str(m.path): m.tensors.source for m in plan.models},  # what each model was read as
    }


def run_merge(
    config: str | os.PathLike | Mapping[str, Any] | MergeConfig,
    out: str | os.PathLike,
    *,
    runs_root: str | os.PathLike | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_plan: Callable[[MergePlan], None] | None = None,
    on_done: Callable[[Job], None] | None = None,
) -> MergeResult:
    """Validate, then merge into the HF directory `out`, recorded as a `merge` run with its inputs and lineage."""
    plan = plan_merge(config, runs_root, parameters, seed, out=out, overwrite=overwrite)
    try:
        return _run(plan, config, out, runs_root, overwrite, max_shard_bytes, on_plan, on_done)
    finally:
        plan.close()


def _run(
    plan: MergePlan,
    config: Any,
    out: str | os.PathLike,
    runs_root: str | os.PathLike | None,
    overwrite: bool,
    max_shard_bytes: int,
    on_plan: Callable[[MergePlan], None] | None,
    on_done: Callable[[Job], None] | None,
) -> MergeResult:
    from mlc.runs import open_run

    _, text, _ = load_config(config)
    if on_plan is not None:
        on_plan(plan)
    resolved = resolved_config(plan)
    merged_from = [{"model": str(m.path), "read_as": m.tensors.source} for m in plan.models]
    with open_run("merge", config=resolved, runs_root=runs_root) as run:
        run.set_config(resolved, given_text=text, given_suffix=".yml")
        base_ref = plan.config.base_model
        for m in plan.models:
            # By its reference as written: a Hub id is recorded with its revision and commit, a run:<id> with its run.
            run.add_input(m.ref, role="base" if m.ref == base_ref else "model")
        meta = {"merge_method": plan.method.name, "merged_from": merged_from}
        try:
            with run.artifact("model", kind="model", out=out, overwrite=overwrite, meta=meta) as staging:
                files = write_model(plan, staging, max_shard_bytes, on_done, config_text=text)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The staging directory is gone with the artifact: say where the space ran out, not a raw errno.
            raise MlcError(
                f"no space left on the disk holding {Path(out).absolute().parent} while writing the merged model",
                "free space there or pass --out on a disk with room; no partial output was left",
            ) from None
        run.set_summary(method=plan.method.name, tensors=len(plan.jobs), models=len(plan.models), out=str(Path(out).absolute()), merged_from=merged_from)
        for w in plan.warnings:
            run.log(f"warning: {w}")
        return MergeResult(Path(out).absolute(), files, len(plan.jobs), run.id, plan.warnings)


def merge_tensors(
    method: str | MergeMethod,
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor with a method by name (a plugin) or object; inputs are not modified."""
    m = plugins.load_one("merge_methods", method) if isinstance(method, str) else method
    if dtype is not None:
        models = [t.to(dtype) for t in models]
        base = base.to(dtype) if base is not None else None
    rng = torch.Generator().manual_seed(seed) if m.random else None
    return m(models, base, params or {}, rng=rng)
