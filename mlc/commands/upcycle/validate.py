"""Check everything before any work: every problem is collected and reported together, nothing written.

validate() turns UpcycleOptions into an UpcyclePlan (resolved paths, the dense config, the output
config and tensor plan, prompts, the merge method) or raises one ValidationError listing every problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlc.commands.upcycle.layout import DENSE_MLP, OutTensor, moe_config, plan_tensors
from mlc.commands.upcycle.options import PROMPT_ROUTERS, ROUTERS, ROUTINGS, UpcycleOptions
from mlc.commands.upcycle.prompts import ExpertPrompts, read_expert_prompts
from mlc.contracts import MergeMethod
from mlc.errors import MlcError, ValidationError

DENSE_FAMILIES = ("llama", "mistral", "qwen2")


@dataclass
class UpcyclePlan:
    opts: UpcycleOptions
    base: Path
    sources: list[Path]  # expert e copies sources[e % len(sources)]; empty: every expert copies the base
    dense: Any  # the base's mlc.models.ModelConfig
    config: dict[str, Any]  # the output config.json
    tensors: list[OutTensor]
    dtype: torch.dtype
    prompts: list[ExpertPrompts] = field(default_factory=list)
    merge_method: MergeMethod | None = None
    merge_params: dict[str, Any] = field(default_factory=dict)
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def expert_source(self, expert: int) -> int | None:
        """Index into sources of the model expert `expert` copies; None for the base."""
        return expert % len(self.sources) if self.sources else None


@dataclass
class _Model:
    path: Path
    config: Any
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype


def validate(opts: UpcycleOptions, runs_root: Path) -> UpcyclePlan:
    """The plan for opts, or a ValidationError that lists every problem found."""
    problems: list[str] = []
    problems += _check_numbers(opts)
    base = _open_model(opts.base, "BASE", runs_root, problems)
    if base is not None:
        problems += _check_base(base, opts)
    sources = [_open_model(s, f"--expert-source {s}", runs_root, problems) for s in opts.expert_sources]
    if len(sources) > opts.experts:
        problems.append(f"{len(sources)} --expert-source models but only {opts.experts} experts: each expert copies one source")
    if base is not None:
        for src, ref in zip(sources, opts.expert_sources):
            if src is not None:
                problems += _check_source(base, src, ref)
    method, merge_params = _check_merge(opts, problems)
    prompts = _check_prompts(opts, base, problems)
    dtype = _check_dtype(opts, base, problems)
    if opts.out is not None and Path(opts.out).exists() and not opts.overwrite:
        problems.append(f"--out {opts.out} already exists (pass --overwrite to replace it)")
    if problems:
        raise ValidationError(problems, what="upcycle inputs")
    assert base is not None and dtype is not None
    from mlc.models.config import dtype_name

    return UpcyclePlan(
        opts=opts,
        base=base.path,
        sources=[s.path for s in sources if s is not None],
        dense=base.config,
        config=moe_config(base.config, opts, dtype_name(dtype)),
        tensors=plan_tensors(base.shapes, opts, base.config.hidden_size),
        dtype=dtype,
        prompts=prompts,
        merge_method=method,
        merge_params=merge_params,
        source_shapes=base.shapes,
    )


def _check_numbers(opts: UpcycleOptions) -> list[str]:
    problems = []
    if opts.experts < 1 or opts.top_k < 1 or opts.top_k > opts.experts:
        problems.append(f"--experts {opts.experts} and --top-k {opts.top_k} must satisfy experts >= top-k >= 1")
    if not 0.0 <= opts.drop_ratio <= 1.0:
        problems.append(f"--drop-ratio {opts.drop_ratio} must be between 0 and 1")
    if opts.router not in ROUTERS:
        problems.append(f"--router {opts.router!r} is not one of {', '.join(ROUTERS)}")
    if opts.routing not in ROUTINGS:
        problems.append(f"--routing {opts.routing!r} is not one of {', '.join(ROUTINGS)}")
    elif opts.routing == "softmax-topk" and not opts.shared_expert:
        problems.append(
            "--routing softmax-topk needs --shared-expert: the Mixtral layout always renormalises the top-k weights "
            "(topk-softmax); Qwen2-MoE can leave them unnormalised (norm_topk_prob false)"
        )
    return problems


def _open_model(ref: str, what: str, runs_root: Path, problems: list[str]) -> _Model | None:
    """Resolve, read config.json and the safetensors headers; on failure add a problem and return None."""
    from mlc.io.hfdir import read_config, require_model_dir
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.models.config import config_from_hf
    from mlc.runs.refs import resolve

    try:
        path = require_model_dir(resolve(ref, runs_root).path)
        config = config_from_hf(read_config(path))
        with ModelTensors(path) as tensors:
            shapes = {n: tensors.info(n).shape for n in tensors.names()}
            embed = tensors.infos.get("model.embed_tokens.weight")
            dtype = embed.dtype if embed is not None else torch.float32
    except MlcError as e:
        problems.append(f"{what}: {e.one_line()}")
        return None
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # a tied head may be stored too; the embedding is the one that counts
    return _Model(path, config, shapes, dtype)


def _check_base(base: _Model, opts: UpcycleOptions) -> list[str]:
    cfg, problems = base.config, []
    if cfg.model_type not in DENSE_FAMILIES:
        problems.append(f"BASE {base.path} is a {cfg.architecture}, not a dense model (upcycle Llama, Mistral or Qwen2 models)")
        return problems
    if cfg.mlp_bias:
        problems.append(f"BASE {base.path} has MLP biases, which neither Mixtral nor Qwen2-MoE experts can hold")
    if cfg.o_bias:
        problems.append(f"BASE {base.path} has an o_proj bias, which neither Mixtral nor Qwen2-MoE attention can hold")
    if cfg.qkv_bias and not opts.shared_expert:
        problems.append(f"BASE {base.path} has q/k/v biases, which Mixtral cannot hold: use --shared-expert (Qwen2-MoE has them)")
    layers = {int(m.group(1)) for n in base.shapes if (m := DENSE_MLP.match(n))}
    mlp = sum(1 for n in base.shapes if DENSE_MLP.match(n))
    if layers != set(range(cfg.num_hidden_layers)) or mlp != 3 * cfg.num_hidden_layers:
        problems.append(f"BASE {base.path} lacks gate/up/down MLP weights in some of its {cfg.num_hidden_layers} layers")
    return problems


def _check_source(base: _Model, src: _Model, ref: str) -> list[str]:
    """A source must be the same architecture with the same tensors and shapes (a fine-tune of the base)."""
    problems = []
    if src.config.model_type != base.config.model_type:
        problems.append(f"--expert-source {ref} is {src.config.architecture}, the base is {base.config.architecture}")
        return problems
    missing = [n for n in base.shapes if n not in src.shapes]
    extra = [n for n in src.shapes if n not in base.shapes]
    shaped = [n for n in base.shapes if n in src.shapes and src.shapes[n] != base.shapes[n]]
    if missing:
        problems.append(f"--expert-source {ref} lacks {len(missing)} of the base's tensors (first: {missing[0]})")
    if extra:
        problems.append(f"--expert-source {ref} has {len(extra)} tensors the base lacks (first: {extra[0]})")
    if shaped:
        n = shaped[0]
        problems.append(
            f"--expert-source {ref}: {len(shaped)} tensors differ in shape from the base "
            f"(first: {n} {list(src.shapes[n])} vs {list(base.shapes[n])})"
        )
    if _vocabulary(src.path) != _vocabulary(base.path):
        problems.append(f"--expert-source {ref} has a different tokenizer vocabulary from the base")
    return problems


def _vocabulary(path: Path) -> Any:
    """The token -> id mapping of tokenizer.json (model vocab and added tokens), None without one."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError:
        return "unreadable"
    added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
    return data.get("model", {}).get("vocab"), added


def _check_merge(opts: UpcycleOptions, problems: list[str]) -> tuple[MergeMethod | None, dict[str, Any]]:
    from mlc.commands.upcycle.shared import merge_problems, parse_merge_params

    params, found = parse_merge_params(opts.merge_params)
    problems += found
    if opts.shared_merge is None:
        if opts.merge_params:
            problems.append("--merge-param sets parameters of --shared-merge, which was not given")
        return None, {}
    if not opts.expert_sources:
        problems.append("--shared-merge merges the --expert-source models, but none was given")
        return None, {}
    from mlc import plugins

    try:
        method: MergeMethod = plugins.load_one("merge_methods", opts.shared_merge)  # type-checked at load
    except MlcError as e:
        problems.append(f"--shared-merge: {e.one_line()}")
        return None, {}
    weight = method.param("weight")
    if weight is not None and weight.required and "weight" not in params:
        params["weight"] = 1.0 / len(opts.expert_sources)  # default: the sources count equally
    problems += merge_problems(method, params, len(opts.expert_sources))
    return method, params


def _check_prompts(opts: UpcycleOptions, base: _Model | None, problems: list[str]) -> list[ExpertPrompts]:
    if opts.router not in PROMPT_ROUTERS:
        if opts.expert_prompts is not None:
            problems.append(f"--expert-prompts is used by --router hidden or cheap_embed, not by --router {opts.router}")
        return []
    if opts.expert_prompts is None:
        problems.append(f"--router {opts.router} needs --expert-prompts FILE with positive prompts for each of the {opts.experts} experts")
        return []
    prompts, found = read_expert_prompts(opts.expert_prompts, opts.experts)
    problems += found
    if base is not None and not (base.path / "tokenizer.json").is_file():
        problems.append(f"--router {opts.router} tokenizes the prompts, but BASE {base.path} has no tokenizer.json")
    return prompts


def _check_dtype(opts: UpcycleOptions, base: _Model | None, problems: list[str]) -> torch.dtype | None:
    from mlc.models.config import parse_dtype

    if opts.dtype is not None:
        try:
            return parse_dtype(opts.dtype)
        except MlcError as e:
            problems.append(f"--dtype: {e.one_line()}")
            return None
    return base.dtype if base is not None else None
