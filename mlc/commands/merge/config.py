"""mergekit's YAML, read as is: checked by pydantic models (every problem at once), turned into the config
dataclasses the planner uses, and parameter settings resolved per tensor.

A parameter setting is a scalar, a gradient (a list of numbers interpolated across the layers of a
slice), or a list of {filter, value} entries whose first entry with `filter` a substring of the
tensor name (or no filter, or "*") applies. Settings are looked up from the most specific level to
the least: slice source (or `models:` entry) > slice > global; the first level that yields a value
wins, else the method's default applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from mlc.contracts import Param
from mlc.dtypes import FLOAT_DTYPES
from mlc.errors import InputError
from mlc.validation import Strict, Wording, dotted, problem, validate_all


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


def parse_config(data: dict[str, Any]) -> tuple[MergeConfig, list[str]]:
    """The config and every structural problem found (not just the first).

    With problems, the config holds what is still usable, so the planner can check the models it names too.
    """
    problems: list[str] = []
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        problems.append("merge_method is missing")
    if bool(data.get("models")) == bool(data.get("slices")):
        problems.append("give exactly one of models: or slices:")
    if data.get("tokenizer") is not None and data.get("tokenizer_source") is not None:
        problems.append("give tokenizer_source or tokenizer, not both")
    file, found = validate_all(MergeFile, data, WORDING)
    problems += [p for p in found if p not in problems]
    file = file or MergeFile()  # nothing usable left: the problems say why
    from_models = bool(data.get("models"))
    if from_models:
        slices = [Slice([Source(m.model, None, m.parameters) for m in file.models or []])]
    else:
        slices = [Slice([Source(s.model, s.layer_range, s.parameters) for s in sl.sources], sl.base_model, sl.parameters)
                  for sl in file.slices or []]
    tokenizer_source, pad = file.tokenizer_source, None
    if file.tokenizer is not None:
        tokenizer_source, pad = file.tokenizer.source, file.tokenizer.pad_to_multiple_of
    config = MergeConfig(
        merge_method=file.merge_method if isinstance(file.merge_method, str) else "",
        slices=slices,
        from_models=from_models,
        base_model=file.base_model,
        parameters=file.parameters,
        dtype=file.dtype,
        out_dtype=file.out_dtype,
        tokenizer_source=tokenizer_source,
        pad_to_multiple_of=pad,
        chat_template=file.chat_template,
    )
    return config, problems


# ---- the YAML as pydantic models: what each key may hold ---------------------------------------


def _model_ref(value: Any) -> Any:
    """mergekit's forms of a model reference (a path, {model: path}, {model: {path: ...}}) as the path."""
    if isinstance(value, dict) and "model" in value and not isinstance(value["model"], dict):
        value = value["model"]
    if isinstance(value, dict) and isinstance(value.get("model"), dict) and "path" in value["model"]:
        if value.get("lora"):
            raise problem("LoRA model references are not supported; fold the adapter first with `mlc merge lora`", ": ")
        value = value["model"]["path"]
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise problem("must be a model path or reference")
    return value


def _layer_range(value: Any) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise problem(f"must be [start, end] with integers, got {value!r}")
    if not 0 <= value[0] < value[1]:
        raise problem(f"{list(value)} is empty or negative")
    return value[0], value[1]


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise problem(f"{value!r} is not one of {', '.join(FLOAT_DTYPES)}")
    return name


def _no_tokens(value: Any) -> Any:
    if value:
        raise problem("(per-token embedding sources) is not supported; new tokens take the mean of the models that have them")
    return value


ModelRef = Annotated[str, BeforeValidator(_model_ref)]
Parameters = Annotated[dict[str, Any], Field(description="a mapping")]
Dtype = Annotated[Optional[str], BeforeValidator(_dtype)]


class _Section(BaseModel):
    model_config = Strict


class ModelEntry(_Section):
    """One entry of `models:` (a bare path is short for {model: path})."""

    model: ModelRef
    parameters: Parameters = {}


class SliceSource(_Section):
    model: ModelRef
    layer_range: Annotated[tuple[int, int], BeforeValidator(_layer_range)]
    parameters: Parameters = {}


class SliceEntry(_Section):
    sources: Annotated[list[SliceSource], Field(min_length=1, description="a list of sources")]
    base_model: Optional[ModelRef] = None
    parameters: Parameters = {}


class TokenizerEntry(_Section):
    source: ModelRef = "union"
    pad_to_multiple_of: Optional[Annotated[int, Field(gt=0)]] = None
    tokens: Annotated[Any, AfterValidator(_no_tokens)] = None


class MergeFile(_Section):
    """The keys a merge YAML may hold (mergekit's, less multi-module architectures)."""

    merge_method: Optional[str] = None  # required: checked by parse_config with the other cross-key rules
    base_model: Optional[ModelRef] = None
    models: Optional[list[Annotated[ModelEntry, BeforeValidator(lambda v: {"model": v} if isinstance(v, str) else v)]]] = None
    slices: Optional[list[SliceEntry]] = None
    parameters: Parameters = {}
    dtype: Dtype = None
    out_dtype: Dtype = None
    tokenizer_source: Annotated[Optional[str], Field(description="base, union or a model")] = None
    tokenizer: Annotated[Optional[TokenizerEntry], Field(description="a mapping with source (and pad_to_multiple_of)")] = None
    chat_template: Annotated[Optional[str], Field(description="a string (auto, a template name, or a Jinja template)")] = None


class _MergeWording(Wording):
    def unknown(self, holder: tuple[Any, ...], key: str, known: list[str]) -> str:
        hint = " (multi-module architectures are not supported: use models: or slices:)" if key == "modules" and not holder else ""
        return f"unknown key {key!r}" + (f" in {dotted(holder)}" if holder else "") + hint


WORDING = _MergeWording(
    typed="{key} must be {what}, got {value!r}", table="{key} must be a mapping, got {value!r}", missing="{holder} needs {what}",
    bound="{key} must be {bound}, got {value!r}",
)


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
