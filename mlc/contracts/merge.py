"""The merge-method contract: one function from input tensors (and a base) to the output tensor.

A method is a plain function

    fn(models: list[Tensor], base: Tensor | None, params: dict, rng: torch.Generator | None) -> Tensor

wrapped by the `merge_method` decorator, which declares its parameters and how it uses a base model.
`models` are the non-base inputs of one output tensor, already in the compute dtype and of equal
shape; the function owns them and may overwrite them in place (the caller never reads them again),
which is how merges stay within a few tensors of memory. `params` holds every declared parameter:
shared ones as scalars, per-model ones as lists aligned with `models`. Random methods get a
generator seeded per tensor, so a merge is reproducible whatever the order tensors are processed in.

Methods register under the `mlc.merge_methods.v1` entry-point group as `name = "module:object"`,
the object being the MergeMethod that `merge_method` returns (discovery reports anything else as
broken). Any command (upcycle's shared-expert merge, a script) loads one with
`mlc.plugins.load_one("merge_methods", name)` and calls it:

    ties = plugins.load_one("merge_methods", "ties")
    out = ties([a, b], base=w0, params={"weight": [0.5, 0.5], "density": 0.5})

Calling the object fills defaults, broadcasts scalar per-model values, checks every value, and works
on copies of the tensors (pass consume=True to hand them over instead). plugins/mlc-merge-geomedian
is a worked example of a third-party method.

This module imports torch lazily so that `mlc --help` and `mlc plugins` stay light.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Mapping, Sequence

if TYPE_CHECKING:
    import torch


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
BasePolicy = Literal["required", "optional", "input"]
# "required": the base is passed separately as `base` and gets no per-model parameters (task
#   arithmetic, TIES, SLERP, ...). "optional": the same when a base_model is configured, else `base`
#   is None (NuSLERP, Multi-SLERP). "input": a base model, if configured, is one more entry of
#   `models` with its own parameters, as mergekit does for linear and passthrough.


@dataclass(frozen=True)
class Param:
    """One parameter a method accepts: its type, default, scope and valid range."""

    name: str
    type: type  # float, int, bool or str
    default: Any = REQUIRED
    per_model: bool = False  # resolved for each non-base input (weight, density) or once (normalize)
    help: str = ""
    check: Callable[[Any], str | None] | None = None  # returns why a value is invalid, or None
    choices: tuple[str, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """The value converted to this parameter's type; ValueError says why it cannot be."""
        if value is None and self.default is None:
            return None  # an optional parameter left unset
        from pydantic import ValidationError

        try:
            return _adapter(self.type, self.choices).validate_python(value)
        except ValidationError:
            what = f"one of {', '.join(self.choices)}" if self.choices else _WHAT.get(self.type, self.type.__name__)
            raise ValueError(f"{self.name} must be {what}, got {value!r}") from None

    def problem(self, value: Any) -> str | None:
        """Why value is not acceptable for this parameter, or None."""
        try:
            value = self.coerce(value)
        except ValueError as e:
            return str(e)
        return self.check(value) if self.check and value is not None else None


_WHAT = {bool: "true or false", float: "a number", int: "an integer", str: "a string"}


@functools.lru_cache(maxsize=None)
def _adapter(kind: type, choices: tuple[str, ...] | None) -> Any:
    """A pydantic validator for one parameter type (lax: "0.5" reads as 0.5, "true" as True, 1 as "1")."""
    from pydantic import BeforeValidator, TypeAdapter

    if kind is str:  # any scalar reads as text, then the choices apply
        return TypeAdapter(Annotated[Literal[choices] if choices else str, BeforeValidator(str)])
    if kind in (int, float):  # True is not the number 1 here: it is a mistake in a config
        return TypeAdapter(Annotated[kind, BeforeValidator(_not_bool)])
    return TypeAdapter(kind)


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], str | None]:
    """A check that a number lies in an interval, e.g. density in (0, 1]."""

    def check(value: float) -> str | None:
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            return f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {value:g}"
        return None

    return check


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: the function plus what the planner needs to validate a config against it."""

    name: str
    fn: Callable[..., "torch.Tensor"]
    params: tuple[Param, ...] = ()
    base: BasePolicy = "required"
    min_models: int = 0  # non-base inputs (with base="input": all inputs)
    max_models: int | None = None
    random: bool = False  # takes a seeded generator
    summary: str = ""
    check: Callable[[dict[str, Any]], str | None] | None = None  # a problem across bound parameters, or None
    # Returns float32 for bfloat16/float16 inputs (and the input dtype otherwise), as mergekit's own
    # implementation of the method does: without out_dtype, such a merge is stored in float32.
    promotes_to_float32: bool = False

    @property
    def takes_base(self) -> bool:
        """Whether a configured base_model is passed as `base` (not as one more input)."""
        return self.base != "input"

    def result_dtype(self, compute: "torch.dtype") -> "torch.dtype":
        """The dtype fn returns for inputs in `compute`."""
        if self.promotes_to_float32:
            import torch

            return torch.promote_types(compute, torch.float32)
        return compute

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def count_problem(self, n_models: int, has_base: bool) -> str | None:
        """Why this number of inputs cannot be merged by this method, or None."""
        if self.base == "required" and not has_base:
            return f"{self.name} needs a base_model"
        if n_models < self.min_models:
            return f"{self.name} needs at least {self.min_models} model(s){' besides the base' if self.takes_base else ''}, got {n_models}"
        if self.max_models is not None and n_models > self.max_models:
            what = "besides the base" if self.takes_base else "per slice"
            return f"{self.name} takes at most {self.max_models} model(s) {what}, got {n_models}"
        return None

    def bind(self, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Every declared parameter with defaults filled, per-model values as lists; ValueError lists problems."""
        problems = []
        unknown = sorted(set(params) - {p.name for p in self.params})
        for name in unknown:
            close = difflib.get_close_matches(name, [p.name for p in self.params], n=1)
            problems.append(f"unknown parameter {name!r} for {self.name}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        bound: dict[str, Any] = {}
        for p in self.params:
            value = params.get(p.name, p.default)
            if value is REQUIRED:
                problems.append(f"{self.name} needs parameter {p.name!r}")
                continue
            if p.per_model:
                values = list(value) if isinstance(value, (list, tuple)) else [value] * n_models
                if len(values) != n_models:
                    problems.append(f"{p.name} has {len(values)} values for {n_models} models")
                    continue
                for v in values:
                    if (why := p.problem(v)) is not None:
                        problems.append(f"{p.name} {why}")
                bound[p.name] = [p.coerce(v) for v in values] if not problems else values
            else:
                if (why := p.problem(value)) is not None:
                    problems.append(f"{p.name} {why}")
                    continue
                bound[p.name] = p.coerce(value)
        if not problems and self.check is not None and (why := self.check(bound)) is not None:
            problems.append(why)
        if problems:
            raise ValueError("; ".join(problems))
        return bound

    def __call__(
        self,
        models: Sequence["torch.Tensor"],
        base: "torch.Tensor | None" = None,
        params: Mapping[str, Any] | None = None,
        rng: "torch.Generator | None" = None,
        consume: bool = False,
    ) -> "torch.Tensor":
        """Merge one tensor: check inputs and parameters, then run the method on (copies of) them."""
        if (why := self.count_problem(len(models), base is not None)) is not None:
            raise ValueError(why)
        shapes = {tuple(t.shape) for t in models} | ({tuple(base.shape)} if base is not None else set())
        if len(shapes) > 1:
            raise ValueError(f"{self.name}: input shapes differ: {sorted(shapes)}")
        bound = self.bind(params or {}, len(models))
        if not consume:
            models = [t.clone() for t in models]
            base = base.clone() if base is not None else None
        if self.random and rng is None:
            import torch

            rng = torch.Generator().manual_seed(0)
        return self.fn(list(models), base, bound, rng)


def merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    base: BasePolicy = "required",
    min_models: int = 0,
    max_models: int | None = None,
    random: bool = False,
    check: Callable[[dict[str, Any]], str | None] | None = None,
    promotes_to_float32: bool = False,
) -> Callable[[Callable[..., "torch.Tensor"]], MergeMethod]:
    """Declare a merge method: decorate fn(models, base, params, rng) -> Tensor."""

    def wrap(fn: Callable[..., "torch.Tensor"]) -> MergeMethod:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return MergeMethod(name, fn, tuple(params), base, min_models, max_models, random, summary, check, promotes_to_float32)

    return wrap
