"""`tp`: tensor-parallel (and expert-parallel) shard directories from other frameworks, read and written by a spec.

    <dir>/mp_rank_00/model_optim_rng.pt ... mp_rank_<tp-1>/...   (mp_rank_TT_EEE/ with expert parallelism)
    each a weights-only torch file: {"model": {name: shard}, "optimizer": {"state": {name: {"exp_avg": shard, ...}}}}
    <dir>/mlc-tp.json   {"spec": ..., "tp": N} when mlc wrote it; config.json and tokenizer files beside it

Megatron-LM's own files also pickle its argparse.Namespace, which mlc refuses to unpickle (weights_only): re-save
their "model" dicts with torch.save first. Optimizer state is read when it is stored per parameter, sharded like
the parameter; Megatron's distributed optimizer (flat fp32 buffers over data-parallel ranks) and DeepSpeed's ZeRO
1/2 partitions are not read: their fragments need the bucket layout of the run that wrote them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError, MlcUsageError
from mlc.io.checkpoints.base import Opened, copy_assets, dtype_str, given_config, output_dtype, require_config, weights, write_config
from mlc.io.checkpoints.torchfile import load_weights_only
from mlc.io.checkpoints.tpspec import Rule, Spec, combine, cut, cut_fused, join_parts, load_spec, split_parts
from mlc.io.formats import OPTIM_SEP, ConvertOptions, TensorEntry
from mlc.io.hfdir import read_config

META = "mlc-tp.json"
RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?$")


def _ranks(path: Path) -> tuple[int, int]:
    """(tp, ep) sizes from the mp_rank_* directories present."""
    found = [RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir()]
    found = [m for m in found if m]
    tps = {int(m[1]) for m in found}
    eps = {int(m[2]) for m in found if m[2] is not None}
    tp, ep = max(tps) + 1, (max(eps) + 1 if eps else 1)
    return tp, ep


class _Shards:
    """Where each whole source parameter's shards are: {source name: {tp rank: (file index, key)}}."""

    def __init__(self, path: Path, spec: Spec, config: dict[str, Any], with_optimizer: bool):
        self.spec, self.config = spec, config
        self.tp, self.ep = _ranks(path)
        self.files: list[dict[str, Any]] = []
        self.where: dict[str, dict[int, tuple[int, str, str | None]]] = {}
        for ep in range(self.ep):
            for tp in range(self.tp):
                template = spec.files_ep if self.ep > 1 else spec.files
                if template is None:
                    raise InputError(f"{path} has expert-parallel ranks but spec {spec.name!r} has no files_ep", "add files_ep to the spec")
                file = path / template.format(tp=tp, ep=ep)
                if not file.is_file():
                    raise InputError(f"{file} is missing (tensor-parallel rank {tp}, expert-parallel rank {ep})", "every rank's shard file is needed")
                loaded = load_weights_only(file)
                model = loaded.get("model", loaded) if isinstance(loaded, dict) else None
                if not isinstance(model, dict):
                    raise InputError(f"{file} holds no 'model' state dict", "each rank file holds {'model': {name: tensor}}")
                optim = loaded.get("optimizer", {}).get("state", {}) if with_optimizer and isinstance(loaded.get("optimizer"), dict) else {}
                self.files.append({"model": model, "optim": optim})
                index = len(self.files) - 1
                local_experts = self._local_expert_count(model)
                for key in model:
                    rule, caps = spec.rule_for(key)
                    if rule.expert:
                        caps[rule.expert] = str(ep * local_experts + int(caps[rule.expert]))
                    elif ep > 0:
                        continue  # dense parameters are replicated over expert-parallel ranks
                    name = rule.match.format(**caps)
                    self.where.setdefault(name, {})[tp] = (index, key, None)
                    for state in optim.get(key, {}):
                        self.where.setdefault(f"{name}{OPTIM_SEP}{state}", {})[tp] = (index, key, state)

    def _local_expert_count(self, model: dict[str, Any]) -> int:
        counts = []
        for key in model:
            rule, caps = self.spec.rule_for(key)
            if rule.expert:
                counts.append(int(caps[rule.expert]) + 1)
        return max(counts, default=1)

    def whole(self, name: str) -> torch.Tensor:
        shards = self.where[name]
        if sorted(shards) != list(range(self.tp)):
            raise InputError(f"parameter {name!r} is missing on tensor-parallel ranks {sorted(set(range(self.tp)) - set(shards))}", "a rank file is incomplete")
        tensors = []
        for r in range(self.tp):
            index, key, state = shards[r]
            f = self.files[index]
            tensors.append(f["model"][key] if state is None else f["optim"][key][state])
        base = name.split(OPTIM_SEP)[0]
        rule, _ = self.spec.rule_for(base)
        return combine(rule, tensors, self.config, base)


class TPFormat:
    name = "tp"
    description = "tensor/expert-parallel shard directories (mp_rank_*/), combined and cut by a shard spec (--spec)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and ((path / META).is_file() or any(RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir()))

    def open(self, path: Path, options: ConvertOptions) -> Opened:
        meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
        spec_name = options.spec or meta.get("spec")
        if not spec_name:
            raise MlcUsageError(f"{path} holds tensor-parallel shards: say how they combine with --spec", "shipped specs: megatron-llama, megatron-gpt; or a TOML file")
        spec = load_spec(spec_name)
        config, assets = given_config(options)
        if config is None and (path / "config.json").is_file():
            config, assets = read_config(path), path
        if config is None:
            raise InputError(f"{path} carries no config.json, which the spec's widths and vocabulary need", "pass --config with the model's config.json")
        shards = _Shards(path, spec, config, options.with_optimizer)
        entries, parts_of = [], {}
        for name in shards.where:
            base, _, state = name.partition(OPTIM_SEP)
            key_file, key, _ = next(iter(shards.where[name].values()))
            rule, caps = spec.rule_for(base)  # the whole parameter's name carries the global expert index
            shape = self._whole_shape(rule, shards, name, config)
            widths, groups = (rule.widths(config), rule.group_count(config)) if len(rule.to) > 1 else ([shape[0] if shape else 0], 1)
            sample = shards.files[key_file]["model"][key] if not state else shards.files[key_file]["optim"][key][state]
            for i, template in enumerate(rule.to):
                hf = template.format(**caps) + (f"{OPTIM_SEP}{state}" if state else "")
                part_shape = shape if len(rule.to) == 1 or not shape else (groups * widths[i], *shape[1:])
                entries.append(TensorEntry(hf, dtype_str(sample.dtype), tuple(part_shape)))
                parts_of[hf] = (name, i, rule)
        cache: dict[str, list[torch.Tensor]] = {}

        def read(hf: str) -> torch.Tensor:
            name, i, rule = parts_of[hf]
            if name not in cache:
                cache.clear()  # keep one whole tensor: q, k and v are read one after another
                whole = shards.whole(name)
                cache[name] = [whole] if whole.ndim == 0 else split_parts(rule, whole, config)
            return cache[name][min(i, len(cache[name]) - 1)].clone()

        info = {"tp": shards.tp, "ep": shards.ep, "spec": spec.name, "optimizer": any(e.is_optimizer for e in entries), "step": meta.get("step")}
        return Opened("tp", path, entries, read, config, assets, info)

    @staticmethod
    def _whole_shape(rule: Rule, shards: _Shards, name: str, config: dict[str, Any]) -> tuple[int, ...]:
        parts = []
        for r in range(shards.tp):
            index, key, state = shards.where[name].get(r, shards.where[name][min(shards.where[name])])
            f = shards.files[index]
            parts.append(tuple((f["model"][key] if state is None else f["optim"][key][state]).shape))
        first = parts[0]
        if not first or rule.shard in ("replicated", "average"):
            return first
        if rule.shard == "row":
            return (first[0], sum(p[1] for p in parts), *first[2:])
        rows = sum(p[0] for p in parts)
        if rule.shard == "vocab":
            rows = int(config["vocab_size"])
        return (rows, *first[1:])

    def write(self, ckpt: Any, out_dir: Path, options: ConvertOptions) -> None:
        """mp_rank_XX/model_optim_rng.pt for XX < --tp, cut by --spec (one rank in memory at a time)."""
        if not options.spec or not options.tp:
            raise MlcUsageError("--to tp needs --spec and --tp", "e.g. --spec megatron-llama --tp 2")
        spec, tp = load_spec(options.spec), options.tp
        config = require_config(ckpt, "the shard spec's widths")
        groups: dict[str, dict[str, Any]] = {}  # source name -> rule and its HF parts (weights and optimizer states)
        for e in weights(ckpt, options):
            base, _, state = e.name.partition(OPTIM_SEP)
            rule, source, part, _ = spec.source_name(base)
            g = groups.setdefault(source, {"rule": rule, "parts": {}})
            g["parts"].setdefault(state or None, {})[part] = e
        for r in range(tp):
            model: dict[str, torch.Tensor] = {}
            optim: dict[str, dict[str, torch.Tensor]] = {}
            for source, g in groups.items():
                rule = g["rule"]
                for state, parts in g["parts"].items():
                    tensors = [ckpt.read(parts[i].name).to(output_dtype(parts[i], options)) for i in sorted(parts)]
                    if len(tensors) != max(1, len(rule.to)):
                        raise InputError(f"{source}: the checkpoint lacks some of {rule.to}", "convert a complete checkpoint")
                    if rule.shard == "fused" and tensors[0].ndim:
                        shard = cut_fused(tensors, tp, source)[r]
                    else:
                        shard = cut(rule, join_parts(rule, tensors, config), tp, spec.vocab_multiple, source)[r]
                    if state is None:
                        model[source] = shard.clone()
                    else:
                        optim.setdefault(source, {})[state] = shard.clone()
            file = out_dir / spec.files.format(tp=r, ep=0)
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model, "optimizer": {"state": optim}} if optim else {"model": model}, file)
            del model, optim
        (out_dir / META).write_text(json.dumps({"spec": options.spec, "tp": tp, "step": ckpt.info.get("step")}, indent=2) + "\n")
        write_config(out_dir, config, None)
        copy_assets(ckpt, out_dir)


TP = TPFormat()
