"""From a parsed config to a checked plan: one job per output tensor, made before any weight is read.

Planning opens every model's config and safetensors headers (never the weights), works out which
input tensors feed each output tensor with which resolved parameters, and collects every problem it
finds: missing or foreign paths, mixed architectures, missing tensors or mismatched shapes, bad layer
ranges, bad dtypes, invalid method parameters, incompatible tokenizers. ValidationError carries them
all, one line each.

Layer structure is read from tensor names: the first `.<number>.` component of a name is its layer
(model.layers.12.mlp.up_proj.weight is layer 12 of the stack model.layers). Tensors outside the
stack are embeddings ("pre", taken from the first slice, as mergekit does) or the final norm and head
("post", from the last slice); both resolve gradients at t = 0, like mergekit.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlc import plugins
from mlc.commands.merge.config import MergeConfig, Slice, Source, resolve
from mlc.contracts import REQUIRED, MergeMethod
from mlc.dtypes import torch_dtype
from mlc.errors import MlcError, ValidationError
from mlc.io.dense import DenseModel, open_dense

LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")


@dataclass
class ModelInput:
    """One referenced model: where it is, its config, its tensor headers and its layer layout."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: DenseModel  # dense tensors under HF names (dequantised on read for GGUF and quantised directories)
    layer_prefix: str | None = None
    layers: dict[int, dict[str, str]] = field(default_factory=dict)  # layer -> suffix -> tensor name
    others: list[str] = field(default_factory=list)  # tensors outside the layer stack, in file order

    @property
    def assets(self) -> Path:
        """The directory holding its tokenizer files."""
        return self.tensors.assets or self.path

    @property
    def num_layers(self) -> int:
        n = self.config.get("num_hidden_layers", self.config.get("n_layer"))
        return int(n) if isinstance(n, int) else len(self.layers)


@dataclass
class Job:
    """One output tensor: its inputs (model index, tensor name), base, bound parameters and shape."""

    name: str
    inputs: list[tuple[int, str]]
    base: tuple[int, str] | None
    params: dict[str, Any]
    shape: tuple[int, ...]
    group: str
    vocab: bool = False  # rows are tokens: re-indexed when tokenizers are merged


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    models: list[ModelInput]
    jobs: list[Job]
    donor: int  # the model whose config and tokenizer the output starts from
    dtype: torch.dtype | None  # compute dtype (None: each tensor's promoted input dtype)
    out_dtype: torch.dtype | None
    out_config: dict[str, Any]
    vocab: Any = None  # a tokenizer.VocabPlan when tokenizers are merged or re-indexed
    seed: int = 0
    warnings: list[str] = field(default_factory=list)
    param_problems: dict[str, list[str]] = field(default_factory=dict)  # message -> tensors it applies to
    missing: dict[str, list[str]] = field(default_factory=dict)  # model -> tensors the merge needs that it lacks
    misshaped: dict[str, list[str]] = field(default_factory=dict)  # model -> "name has shape [..], expected [..]"

    def close(self) -> None:
        """Close every input (a GGUF input removes its unpacked tokenizer)."""
        for m in self.models:
            m.tensors.close()

    def input_bytes(self, job: Job) -> int:
        refs = job.inputs + ([job.base] if job.base else [])
        return sum(self.models[m].tensors.info(n).nbytes for m, n in refs)

    def output_dtype(self, job: Job) -> torch.dtype:
        """out_dtype, else what the method returns for the compute dtype (as mergekit stores it)."""
        if self.out_dtype is not None:
            return self.out_dtype
        return self.method.result_dtype(self.compute_dtype(job))

    def compute_dtype(self, job: Job) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        dtype = None
        for m, n in job.inputs + ([job.base] if job.base else []):
            d = self.models[m].tensors.info(n).dtype
            dtype = d if dtype is None else torch.promote_types(dtype, d)
        return dtype  # type: ignore[return-value]


def resolve_ref(ref: str, runs_root: Path) -> Path:
    from mlc.runs.refs import resolve as resolve_artifact

    return resolve_artifact(ref, runs_root).path


def load_method(name: str) -> MergeMethod:
    return plugins.load_one("merge_methods", name)  # discovery checked that it is a MergeMethod


def open_models(refs: list[str], runs_root: Path, problems: list[str]) -> dict[str, ModelInput]:
    """Each reference resolved and opened (config + headers); failures become problems."""
    opened: dict[str, ModelInput] = {}
    for ref in refs:
        try:
            path = resolve_ref(ref, runs_root)
            tensors = open_dense(path)
        except MlcError as e:
            problems.append(f"model {ref}: {e.message}")
            continue
        model = ModelInput(ref, path, tensors.config, tensors)
        _find_layers(model, problems)
        opened[ref] = model
    return opened


def _find_layers(model: ModelInput, problems: list[str]) -> None:
    by_prefix: dict[str, int] = {}
    for name in model.tensors.names():
        m = LAYER_RE.match(name)
        if m:
            by_prefix[m.group(1)] = by_prefix.get(m.group(1), 0) + 1
    model.layer_prefix = max(by_prefix, key=by_prefix.__getitem__) if by_prefix else None
    for name in model.tensors.names():
        m = LAYER_RE.match(name)
        if m and m.group(1) == model.layer_prefix:
            model.layers.setdefault(int(m.group(2)), {})[m.group(3)] = name
        else:
            model.others.append(name)
    missing = [i for i in range(model.num_layers) if i not in model.layers]
    if missing:
        problems.append(f"model {model.ref}: config says {model.num_layers} layers but layer {missing[0]} has no tensors")


def _is_pre(name: str) -> bool:
    return any(h in name for h in PRE_HINTS)


def build_plan(
    config: MergeConfig,
    runs_root: Path,
    parameter_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> MergePlan:
    """Check everything and plan every output tensor; raise ValidationError with all problems."""
    problems: list[str] = []
    method = None
    try:
        method = load_method(config.merge_method) if config.merge_method else None
    except MlcError as e:
        problems.append(e.one_line())
    models = open_models(config.model_refs(), runs_root, problems)
    try:
        return _plan(config, runs_root, method, models, problems, parameter_overrides, seed)
    except BaseException:
        for m in models.values():
            m.tensors.close()
        raise


def _plan(
    config: MergeConfig,
    runs_root: Path,
    method: MergeMethod | None,
    models: dict[str, ModelInput],
    problems: list[str],
    parameter_overrides: dict[str, Any] | None,
    seed: int,
) -> MergePlan:
    _check_architectures(models, problems)
    experts_differ = _check_experts(models, problems)
    if config.chat_template:
        from mlc.commands.merge import chat_templates

        if (why := chat_templates.problem(config.chat_template)) is not None:
            problems.append(why)
    if method is None or not config.slices or not models:
        raise ValidationError(problems or ["nothing to merge"], what="merge config")
    # Models that failed to open were reported; plan with the rest so that every other problem shows too.
    slices = _normalize_slices(config, method, models, problems)
    if not any(sl.sources for sl in slices):
        raise ValidationError(problems, what="merge config")
    refs = list(models)
    index = {r: i for i, r in enumerate(refs)}
    donor_ref = config.base_model if config.base_model in models else next(s.model for sl in slices for s in sl.sources)
    plan = MergePlan(
        config=config,
        method=method,
        models=[models[r] for r in refs],
        jobs=[],
        donor=index[donor_ref],
        dtype=torch_dtype(config.dtype) if config.dtype else None,
        out_dtype=torch_dtype(config.out_dtype) if config.out_dtype else None,
        out_config={},
        seed=seed,
    )
    global_levels = [dict(config.parameters, **(parameter_overrides or {}))]
    all_levels = global_levels + [sl.parameters for sl in slices] + [s.parameters for sl in slices for s in sl.sources]
    _report_unknown(method, all_levels, problems, plan.warnings)
    _plan_jobs(plan, slices, global_levels, index, problems)
    for message, tensors in plan.param_problems.items():
        more = f" and {len(tensors) - 1} more tensors" if len(tensors) > 1 else ""
        problems.append(f"{message} (at {tensors[0]}{more})")
    from mlc.commands.merge import tokenizer

    plan.vocab = tokenizer.plan_vocab(plan, problems)
    _check_shapes(plan, problems)
    if not experts_differ:  # else the missing experts and router shapes only restate that
        problems += _tensor_problems(plan)
    if problems:
        raise ValidationError(_dedupe(problems), what="merge config")
    plan.out_config = _out_config(plan, sum(_slice_len(s) for s in slices))
    return plan


def _check_architectures(models: dict[str, ModelInput], problems: list[str]) -> None:
    archs = {ref: tuple(m.config.get("architectures") or [m.config.get("model_type", "?")]) for ref, m in models.items()}
    if len(set(archs.values())) > 1:
        first = next(iter(archs))
        for ref, arch in archs.items():
            if arch != archs[first]:
                problems.append(f"model {ref} is a {'/'.join(arch)}, but {first} is a {'/'.join(archs[first])}: architectures must match")


EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _check_experts(models: dict[str, ModelInput], problems: list[str]) -> bool:
    """MoE models merge expert by expert (and router with router), so every model needs the same expert count."""
    counts = {ref: next((m.config[k] for k in EXPERT_KEYS if isinstance(m.config.get(k), int)), None) for ref, m in models.items()}
    if len(set(counts.values())) <= 1:
        return False
    detail = ", ".join(f"{ref}: {n or 'dense'}" for ref, n in counts.items())
    problems.append(f"MoE models merge expert by expert and need the same number of experts ({detail})")
    return True


def _slice_len(s: Slice) -> int:
    lr = s.sources[0].layer_range
    return lr[1] - lr[0] if lr else 0


def _normalize_slices(config: MergeConfig, method: MergeMethod, models: dict[str, ModelInput], problems: list[str]) -> list[Slice]:
    """Slices with explicit layer ranges; `models:` gains the base as an input if it is not listed (as in mergekit)."""
    slices = []
    for i, sl in enumerate(config.slices):
        sources = list(sl.sources)
        base = sl.base_model or config.base_model
        if config.from_models and base and all(s.model != base for s in sources):
            sources.append(Source(base))
        where = "models" if config.from_models else f"slices[{i}]"
        seen = set()
        for s in sources:
            if s.model in seen:
                problems.append(f"{where}: model {s.model} appears twice")
            seen.add(s.model)
        resolved = []
        for s in sources:
            if s.model not in models:
                continue
            n = models[s.model].num_layers
            lr = s.layer_range or (0, n)
            if lr[1] > n:
                problems.append(f"{where}: layer_range {list(lr)} of {s.model} goes past its {n} layers")
            resolved.append(Source(s.model, lr, s.parameters))
        lengths = {r.layer_range[1] - r.layer_range[0] for r in resolved}
        if len(lengths) > 1:
            detail = ", ".join(f"{r.model}: {r.layer_range[1] - r.layer_range[0]}" for r in resolved)
            problems.append(f"{where}: every source must span the same number of layers ({detail})")
        if method.takes_base and base is not None and all(r.model != base for r in resolved):
            problems.append(f"{where}: the base model {base} must be one of the sources")
        n_models = sum(r.model != base for r in resolved) if method.takes_base else len(resolved)
        why = method.count_problem(n_models, base is not None)
        if why:
            problems.append(f"{where}: {why}" if config.slices[1:] else why)
        slices.append(Slice(resolved, base, sl.parameters))
    return slices


def _plan_jobs(plan: MergePlan, slices: list[Slice], global_levels: list[dict[str, Any]], index: dict[str, int], problems: list[str]) -> None:
    donor = plan.models[plan.donor]
    others = list(donor.others)
    for m in plan.models:  # a head that only untied models have still gets merged
        others += [n for n in m.others if n in HEAD_NAMES and n not in others]
    pre = [n for n in others if _is_pre(n)]
    post = [n for n in others if not _is_pre(n)]
    for name in pre:
        _add_job(plan, slices[0], name, lambda src, n=name: n, 0.0, "embeddings", global_levels, index, problems)
    out_layer = 0
    for sl in slices:
        length = _slice_len(sl)
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            first = plan.models[index[sl.sources[0].model]]
            for suffix in first.layers.get(sl.sources[0].layer_range[0] + offset, {}):
                out_name = f"{donor.layer_prefix}.{out_layer}.{suffix}"

                def input_name(src: Source, suffix: str = suffix, offset: int = offset) -> str | None:
                    return plan.models[index[src.model]].layers.get(src.layer_range[0] + offset, {}).get(suffix)

                _add_job(plan, sl, out_name, input_name, t, f"layer {out_layer}", global_levels, index, problems)
            out_layer += 1
    for name in post:
        _add_job(plan, slices[-1], name, lambda src, n=name: n, 0.0, "head", global_levels, index, problems)


def _add_job(plan, sl, out_name, input_name, t, group, global_levels, index, problems) -> None:  # type: ignore[no-untyped-def]
    method = plan.method
    shared_levels = [sl.parameters, *global_levels]
    inputs: list[tuple[int, str]] = []
    raw: dict[str, Any] | None = {p.name: [] for p in method.params if p.per_model}
    base: tuple[int, str] | None = None
    try:
        for src in sl.sources:
            model = plan.models[index[src.model]]
            name = input_name(src)
            if name is not None and name not in model.tensors and name in HEAD_NAMES:
                name = _tied_embedding(model)  # a tied head is the input embedding
            if name is None or name not in model.tensors:
                plan.missing.setdefault(src.model, []).append(name or out_name)
                continue
            if method.takes_base and src.model == sl.base_model:
                base = (index[src.model], name)
                continue
            inputs.append((index[src.model], name))
            levels = [s.parameters for s in sl.sources if s.model == src.model] + shared_levels
            for p in method.params:
                if p.per_model:  # per-model filters match the input's own tensor name, as in mergekit
                    raw[p.name].append(resolve(p, levels, name, t))
        for p in method.params:
            if not p.per_model:
                raw[p.name] = resolve(p, shared_levels, out_name, t)
    except ValueError as e:
        plan.param_problems.setdefault(str(e), []).append(out_name)
        raw = None
    if not inputs and base is None:
        return
    bound: dict[str, Any] = {}
    if raw is not None:
        given = {k: v for k, v in raw.items() if v is not REQUIRED and not (isinstance(v, list) and REQUIRED in v)}
        try:
            bound = method.bind(given, len(inputs))
        except ValueError as e:  # the job is still planned, so that its shapes are checked too
            for message in str(e).split("; "):
                plan.param_problems.setdefault(message, []).append(out_name)
    m, name = base or inputs[0]
    plan.jobs.append(Job(out_name, inputs, base, bound, tuple(plan.models[m].tensors.info(name).shape), group))


# Parameters of mergekit methods that mlc's methods may not take: mergekit ignores them silently, mlc warns.
MERGEKIT_PARAMS = {
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t", "filter_wise",
    "scale", "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "max_iter", "tol", "k", "alpha", "beta",
}


def _report_unknown(method: MergeMethod, levels: list[dict[str, Any]], problems: list[str], warnings: list[str]) -> None:
    known = {p.name for p in method.params}
    for level in levels:
        for key in level:
            if key in known:
                continue
            if key in MERGEKIT_PARAMS:
                warnings.append(f"parameter {key!r} is not used by {method.name}; ignored, as mergekit does")
            else:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" ({method.name} takes: {', '.join(sorted(known)) or 'none'})"
                problems.append(f"unknown parameter {key!r}{hint}")


def _tied_embedding(model: ModelInput) -> str | None:
    embeds = [n for n in model.others if _is_pre(n) and n.endswith("weight") and len(model.tensors.info(n).shape) == 2]
    return embeds[0] if len(embeds) == 1 else None


def _check_shapes(plan: MergePlan, problems: list[str]) -> None:
    for job in plan.jobs:
        for m, name in job.inputs + ([job.base] if job.base else []):
            info = plan.models[m].tensors.info(name)
            if job.vocab:
                ok = info.shape[1:] == job.shape[1:]
            else:
                ok = info.shape == job.shape
            if not ok:
                plan.misshaped.setdefault(plan.models[m].ref, []).append(f"{name} has shape {list(info.shape)}, expected {list(job.shape)}")
            if not info.dtype.is_floating_point and info.dtype != plan.models[job.inputs[0][0]].tensors.info(job.inputs[0][1]).dtype:
                problems.append(f"model {plan.models[m].ref}: {name} is {info.dtype}, other inputs are not")


def _tensor_problems(plan: MergePlan, shown: int = 3) -> list[str]:
    """Missing and misshaped tensors, one line per model (a Llama against a GPT-2 lacks hundreds)."""
    lines = []
    for ref, names in plan.missing.items():
        if len(names) <= shown:
            lines += [f"model {ref} has no tensor {n}" for n in names]
        else:
            lines.append(f"model {ref} lacks {len(names)} tensors the merge needs ({', '.join(names[:shown])}, ...)")
    for ref, found in plan.misshaped.items():
        if len(found) <= shown:
            lines += [f"model {ref}: {f}" for f in found]
        else:
            lines.append(f"model {ref}: {len(found)} tensors have other shapes ({'; '.join(found[:shown])}; ...)")
    return lines


def _dedupe(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


def _out_config(plan: MergePlan, n_layers: int) -> dict[str, Any]:
    cfg = copy.deepcopy(plan.models[plan.donor].config)
    cfg.pop("quantization_config", None)  # quantised inputs are read dense: the output is dense
    if "num_hidden_layers" in cfg or "n_layer" not in cfg:
        cfg["num_hidden_layers"] = n_layers
    else:
        cfg["n_layer"] = n_layers
    dtype_name = plan.config.out_dtype or plan.config.dtype
    if dtype_name:
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
        for k in keys:
            cfg[k] = dtype_name
    names = {j.name for j in plan.jobs}
    if any(n in names for n in HEAD_NAMES) and cfg.get("tie_word_embeddings", True):
        cfg["tie_word_embeddings"] = False  # some input had its own head, so the output has one
    if plan.vocab is not None:
        cfg["vocab_size"] = plan.vocab.size
    return cfg
