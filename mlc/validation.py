"""User input checked by pydantic models and reported the mlc way: every problem at once, each naming its
key, an unknown key with the closest known one ("did you mean"), values described in the user's words.

pydantic does the checking (types, unknown keys, choices, ranges, the validators a config adds); this
module only words its errors. Config models use `Strict` (unknown keys are errors; no silent str -> int
conversions: TOML and YAML already give numbers as numbers). A validator raises `problem(text)` for a
message of its own. `validate_all` also returns what is still usable of a config with problems, so a
command can go on to check the files it names and report everything in one go.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

Strict = ConfigDict(extra="forbid", strict=True)
Model = TypeVar("Model", bound=BaseModel)
Location = tuple[Any, ...]
WHAT = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
TYPE_ERRORS = {"int_type", "float_type", "string_type", "bool_type", "literal_error", "list_type", "dict_type", "none_required",
               "too_short"}
TABLE_ERRORS = {"model_type", "model_attributes_type"}
BOUNDS = {"greater_than_equal": ("at least", "ge"), "greater_than": ("greater than", "gt"),
          "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}


def problem(text: str, sep: str = " ") -> PydanticCustomError:
    """An error for a validator to raise; reported as `<key><sep><text>`."""
    return PydanticCustomError("mlc", "{text}", {"text": text, "sep": sep})


def dotted(loc: Location) -> str:
    """train.steps, models[0].parameters: keys joined by dots, list positions in brackets."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class Wording:
    """How one kind of config words its problems (the defaults are the TOML configs': `train.steps: ...`)."""

    typed: str = "{key}: expected {what}, got {value!r}"
    table: str = "{key}: expected a table, got {value!r}"
    missing: str = "{key}: missing"
    bound: str = "{key}: must be {bound}, got {value!r}"
    where: Callable[[Location], str] = dotted

    def unknown(self, holder: Location, key: str, known: list[str]) -> str:
        """"unknown key train.stpes (did you mean train.steps?)"."""
        prefix = self.where(holder) + "." if holder else ""
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else (f"; known: {', '.join(known)}" if known else "")
        return f"unknown key {prefix}{key}{hint}"


def describe(annotation: Any, description: str | None = None) -> str:
    """What a value of this type is, in the words a config error uses ("an integer", "one of 'a', 'b'")."""
    if description:
        return description
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return describe(typing.get_args(annotation)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(item, describe(item))
    if origin is dict:
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation) if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a table"
    return WHAT.get(getattr(annotation, "__name__", ""), getattr(annotation, "__name__", str(annotation)))


def problems(error: ValidationError, model: type[BaseModel], raw: Any, wording: Wording = Wording()) -> list[str]:
    """One line per problem in a pydantic error on `raw` (the data validated), each naming its key."""
    lines: list[str] = []
    for e in error.errors():
        loc, kind = _user_loc(tuple(e["loc"])), e["type"]
        if kind == "extra_forbidden":
            holder = _model_at(model, loc[:-1])
            lines.append(wording.unknown(loc[:-1], str(loc[-1]), list(holder.model_fields) if holder else []))
            continue
        if kind not in ("mlc", "missing"):
            # A wrong item of a list of plain values is reported for the whole list ("a list of numbers").
            while loc and isinstance(loc[-1], int) and _model_in(_field(model, loc)[0]) is None:
                loc, kind = loc[:-1], kind if kind in BOUNDS else "list_type"
        key, value = wording.where(loc) or "config", _lookup(raw, loc)
        annotation, description = _field(model, loc)
        if kind == "mlc":
            lines.append(f"{key}{e['ctx']['sep']}{e['ctx']['text']}")
        elif kind in TABLE_ERRORS:
            lines.append(wording.table.format(key=key, value=value))
        elif kind == "missing":
            what = description or f"a {loc[-1]}"
            lines.append(wording.missing.format(key=key, holder=wording.where(loc[:-1]), what=what))
        elif kind in BOUNDS:
            words, ctx_key = BOUNDS[kind]
            lines.append(wording.bound.format(key=key, bound=f"{words} {_number(e['ctx'][ctx_key])}", value=e.get("input")))
        elif kind in TYPE_ERRORS and annotation is not None:
            lines.append(wording.typed.format(key=key, what=describe(annotation, description), value=value))
        else:
            lines.append(f"{key}: {e['msg'][0].lower()}{e['msg'][1:]}")
    return list(dict.fromkeys(lines))  # a list with several bad items is one problem


def validate_all(model: type[Model], raw: dict[str, Any], wording: Wording = Wording()) -> tuple[Model | None, list[str]]:
    """(the config, []) when raw is valid; else (what validates once the bad values are left out, every problem).

    The partial config lets a command check what the rest of the config names (files, models) before it
    reports, so one run lists every problem. Left out: an unknown key, a wrong value, and then the entry
    holding a value that was required.
    """
    found: list[str] = []
    data = copy.deepcopy(raw)
    for _ in range(8):  # each round removes at least one value
        try:
            return model.model_validate(data), found
        except ValidationError as e:
            if not found:
                found = problems(e, model, raw, wording)
            locs = [_user_loc(tuple(x["loc"])) for x in e.errors()]
            locs = [loc[:-1] if x["type"] == "missing" else loc for loc, x in zip(locs, e.errors())]
            removed = [_remove(data, loc) for loc in sorted(locs, key=_reverse_order)]
            if not any(removed):
                break
    return None, found


def _number(x: Any) -> Any:
    return f"{x:g}" if isinstance(x, float) else x


def _user_loc(loc: Location) -> Location:
    # pydantic puts the union member or validator it tried into the location ("list[float]", "function-after[...]")
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in WHAT)))


def _reverse_order(loc: Location) -> list[Any]:
    # Later list items first, so removing one does not shift the position of another.
    return [-p if isinstance(p, int) else 0 for p in loc]


def _remove(data: Any, loc: Location) -> bool:
    if not loc:
        return False
    parent = _lookup(data, loc[:-1])
    try:
        del parent[loc[-1]]
    except (KeyError, IndexError, TypeError):
        return False
    return True


def _lookup(raw: Any, loc: Location) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _model_at(model: type[BaseModel], loc: Location) -> type[BaseModel] | None:
    """The model that holds the keys at loc (None past a free-form value)."""
    annotation: Any = model
    for part in loc:
        annotation = _item(annotation) if isinstance(part, int) else _field_of(_model_in(annotation), part)[0]
    return _model_in(annotation)


def _field(model: type[BaseModel], loc: Location) -> tuple[Any, str | None]:
    """(annotation, description) of the field at loc; (None, None) past a free-form value."""
    if not loc:
        return model, None
    if isinstance(loc[-1], int):
        return _item(_field(model, loc[:-1])[0]), None
    return _field_of(_model_at(model, loc[:-1]), loc[-1])


def _field_of(holder: type[BaseModel] | None, name: Any) -> tuple[Any, str | None]:
    if holder is None or name not in holder.model_fields:
        return None, None
    info = holder.model_fields[name]
    return info.annotation, info.description


def _item(annotation: Any) -> Any:
    """X for list[X], also inside Annotated[...] or a union with None."""
    if typing.get_origin(annotation) is list:
        return (typing.get_args(annotation) or (Any,))[0]
    for arg in typing.get_args(annotation):
        if (found := _item(arg)) is not None:
            return found
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel a field holds (directly, optionally, annotated, or as one member of a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None
