"""mergekit's YAML, read as is: the config dataclasses, and parameter settings resolved per tensor.

A parameter setting is a scalar, a gradient (a list of numbers interpolated across the layers of a
slice), or a list of {filter, value} entries whose first entry with `filter` a substring of the
tensor name (or no filter, or "*") applies. Settings are looked up from the most specific level to
the least: slice source (or `models:` entry) > slice > global; the first level that yields a value
wins, else the method's default applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from mlc.commands.merge.method import Param
from mlc.errors import InputError

DTYPES = ("float32", "float16", "bfloat16", "float64")
TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}


@dataclass
class Source:
    """One input of a slice: a model reference, its layer range (None: all layers) and its parameters."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[Source]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """A parsed merge config; `models:` configs become one slice whose sources span every layer."""

    merge_method: str
    slices: list[Slice]
    from_models: bool  # written with `models:` (the base joins the inputs if missing, as in mergekit)
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", "union" or a model reference
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None

    def model_refs(self) -> list[str]:
        """Every model reference, base first, each once, in order of appearance."""
        refs = [self.base_model] if self.base_model else []
        for s in self.slices:
            refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        if self.tokenizer_source not in (None, "base", "union"):
            refs.append(self.tokenizer_source)
        return list(dict.fromkeys(r for r in refs if r))

    def to_dict(self) -> dict[str, Any]:
        """The config back in mergekit's YAML shape (as resolved references are substituted by the caller)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            out["base_model"] = self.base_model
        if self.from_models:
            out["models"] = [{"model": s.model, **({"parameters": s.parameters} if s.parameters else {})} for s in self.slices[0].sources]
        else:
            out["slices"] = [
                {
                    "sources": [
                        {"model": s.model, "layer_range": list(s.layer_range or ()), **({"parameters": s.parameters} if s.parameters else {})}
                        for s in sl.sources
                    ],
                    **({"base_model": sl.base_model} if sl.base_model else {}),
                    **({"parameters": sl.parameters} if sl.parameters else {}),
                }
                for sl in self.slices
            ]
        for key in ("parameters", "dtype", "out_dtype", "tokenizer_source", "chat_template"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.pad_to_multiple_of:
            out["tokenizer"] = {"source": self.tokenizer_source or "union", "pad_to_multiple_of": self.pad_to_multiple_of}
            out.pop("tokenizer_source", None)
        return out


def load_yaml(path: str | Path) -> tuple[dict[str, Any], str]:
    """The YAML file as a mapping, and its text."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} does not exist or is not a file", "pass a mergekit-style YAML config")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise InputError(f"{p} is not valid YAML{where}", "fix the syntax") from None
    if not isinstance(data, dict):
        raise InputError(f"{p} does not hold a mapping of settings", "a merge config starts with keys like merge_method:")
    return data, text


def parse_config(data: dict[str, Any]) -> tuple[MergeConfig | None, list[str]]:
    """The config and every structural problem found (not just the first)."""
    problems: list[str] = []
    for key in sorted(set(data) - TOP_KEYS):
        hint = " (multi-module architectures are not supported: use models: or slices:)" if key == "modules" else ""
        problems.append(f"unknown key {key!r}{hint}")
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        problems.append("merge_method is missing")
    has_models, has_slices = bool(data.get("models")), bool(data.get("slices"))
    if has_models == has_slices:
        problems.append("give exactly one of models: or slices:")
    base = _ref(data.get("base_model"), "base_model", problems)
    slices: list[Slice] = []
    if has_models and isinstance(data["models"], list):
        sources = [_source(m, f"models[{i}]", problems, with_range=False) for i, m in enumerate(data["models"])]
        slices = [Slice([s for s in sources if s is not None])]
    elif has_models:
        problems.append("models must be a list")
    if has_slices and isinstance(data["slices"], list):
        for i, sl in enumerate(data["slices"]):
            where = f"slices[{i}]"
            if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
                problems.append(f"{where} needs a list of sources")
                continue
            for key in sorted(set(sl) - {"sources", "base_model", "parameters"}):
                problems.append(f"unknown key {key!r} in {where}")
            sources = [_source(s, f"{where}.sources[{j}]", problems, with_range=True) for j, s in enumerate(sl["sources"])]
            slices.append(Slice([s for s in sources if s is not None], _ref(sl.get("base_model"), f"{where}.base_model", problems), _params(sl.get("parameters"), where, problems)))
    elif has_slices:
        problems.append("slices must be a list")
    dtype, out_dtype = (_dtype(data.get(k), k, problems) for k in ("dtype", "out_dtype"))
    tokenizer_source, pad = data.get("tokenizer_source"), None
    if data.get("tokenizer") is not None:
        tokenizer_source, pad = _tokenizer(data["tokenizer"], tokenizer_source, problems)
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        problems.append("tokenizer_source must be base, union or a model")
        tokenizer_source = None
    chat = data.get("chat_template")
    if chat is not None and not isinstance(chat, str):
        problems.append("chat_template must be a string (auto, a template name, or a Jinja template)")
    config = MergeConfig(
        merge_method=method if isinstance(method, str) else "",
        slices=slices,
        from_models=has_models,
        base_model=base,
        parameters=_params(data.get("parameters"), "", problems),
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source=tokenizer_source,
        pad_to_multiple_of=pad,
        chat_template=chat if isinstance(chat, str) else None,
    )
    return config, problems


def _ref(value: Any, where: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict) and "model" in value and not isinstance(value["model"], dict):
        value = value["model"]
    if isinstance(value, dict) and isinstance(value.get("model"), dict) and "path" in value["model"]:
        if value.get("lora"):
            problems.append(f"{where}: LoRA model references are not supported; fold the adapter first with `mlc merge lora`")
        value = value["model"]["path"]
    if not isinstance(value, (str, Path)) or not str(value):
        problems.append(f"{where} must be a model path or reference")
        return None
    return str(value)


def _source(entry: Any, where: str, problems: list[str], with_range: bool) -> Source | None:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        problems.append(f"{where} needs a model")
        return None
    allowed = {"model", "parameters"} | ({"layer_range"} if with_range else set())
    for key in sorted(set(entry) - allowed):
        problems.append(f"unknown key {key!r} in {where}")
    ref = _ref(entry["model"], f"{where}.model", problems)
    layer_range = None
    if with_range:
        lr = entry.get("layer_range")
        if not (isinstance(lr, (list, tuple)) and len(lr) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in lr)):
            problems.append(f"{where}.layer_range must be [start, end] with integers, got {lr!r}")
        elif not 0 <= lr[0] < lr[1]:
            problems.append(f"{where}.layer_range {list(lr)} is empty or negative")
        else:
            layer_range = (lr[0], lr[1])
    if ref is None:
        return None
    return Source(ref, layer_range, _params(entry.get("parameters"), where, problems))


def _params(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where + '.' if where else ''}parameters must be a mapping")
        return {}
    return dict(value)


def _dtype(value: Any, key: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        problems.append(f"{key} {value!r} is not one of {', '.join(DTYPES)}")
        return None
    return name


def _tokenizer(value: Any, tokenizer_source: Any, problems: list[str]) -> tuple[Any, int | None]:
    if tokenizer_source is not None:
        problems.append("give tokenizer_source or tokenizer, not both")
    if not isinstance(value, dict):
        problems.append("tokenizer must be a mapping with source (and pad_to_multiple_of)")
        return None, None
    for key in sorted(set(value) - {"source", "pad_to_multiple_of", "tokens"}):
        problems.append(f"unknown key {key!r} in tokenizer")
    if value.get("tokens"):
        problems.append("tokenizer.tokens (per-token embedding sources) is not supported; new tokens take the mean of the models that have them")
    pad = value.get("pad_to_multiple_of")
    if pad is not None and not (isinstance(pad, int) and pad > 0):
        problems.append(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
        pad = None
    source = value.get("source", "union")
    if isinstance(source, dict):
        source = _ref(source, "tokenizer.source", problems)
    return source, pad


# ---- parameter settings ------------------------------------------------------------------------


class NoValue(Exception):
    """A setting exists but yields nothing for this tensor (no filter matched)."""


def evaluate(setting: Any, param: Param, tensor_name: str, t: float) -> Any:
    """One setting's value for a tensor at relative layer position t in [0, 1]; NoValue if none applies."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise NoValue
        if all(not isinstance(e, (dict, list)) for e in setting):
            values = [param.coerce(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            # A gradient: linear interpolation between the two nearest points.
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return param.coerce((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise ValueError(f"{param.name}: each entry of a filtered setting needs a value (and optionally a filter)")
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
                return evaluate(cond["value"], param, tensor_name, t)
        raise NoValue
    return param.coerce(setting)


def resolve(param: Param, levels: Iterable[dict[str, Any]], tensor_name: str, t: float) -> Any:
    """The parameter's value from the first level that gives one, else its default (REQUIRED if none)."""
    for level in levels:
        if param.name in level:
            try:
                return evaluate(level[param.name], param, tensor_name, t)
            except NoValue:
                continue
    return param.default
