"""The training config: TOML sections as dataclasses, `--set section.key=value` overrides, validation before work.

Every problem is collected and reported at once, each naming its key (`train.steps: expected an integer, got 'ten'`),
before a model is built or a token is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mlc.errors import InputError, MlcError, ValidationError


@dataclass
class ModelSection:
    config: str = ""  # a config.json (or a directory holding one): pretrain from scratch
    init: str = ""  # an HF model directory or run reference: continue pretraining or fine-tune from it
    tokenizer: str = ""  # a directory with tokenizer.json; default: the model's own directory
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the weights the optimizer updates


@dataclass
class DataSection:
    mode: Literal["pretrain", "sft"] = "pretrain"
    train: str = ""  # text file (pretrain) or chat JSONL with {"messages": [...]} per line (sft)
    eval: str = ""  # held-out file of the same kind; empty: hold out val_fraction of train
    val_fraction: float = 0.05
    seq_len: int = 256
    shuffle: bool = True


@dataclass
class TrainSection:
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch_size: int = 8  # sequences per forward pass on one process
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast around forward and loss
    parallel: Literal["ddp", "fsdp"] = "ddp"  # how more than one process shares the work
    compile: bool = False  # torch.compile each transformer block
    seed: int = 0


@dataclass
class OptimSection:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon for 2-D hidden matrices, AdamW for the rest
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.95  # Muon's
    nesterov: bool = True  # Muon's
    ns_steps: int = 5  # Muon's Newton-Schulz iterations


@dataclass
class ScheduleSection:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_start: float = 0.0  # warm-up starts at lr * warmup_start (re-warming a trained model starts low)
    min_lr_ratio: float = 0.1  # cosine and WSD end at lr * min_lr_ratio
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Every projection; w1/w2/w3 are Mixtral's expert names (Qwen2-MoE experts reuse gate/up/down_proj).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"]
    )


@dataclass
class MoeSection:
    aux_loss_coef: float = 0.01  # Switch-style load-balancing loss; 0 disables
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE); 0 disables


@dataclass
class EvalSection:
    interval: int = 0  # steps between evaluations; 0: only at the end
    max_sequences: int = 64  # held-out sequences per evaluation (all processes together; the first ones, fixed)


@dataclass
class CheckpointSection:
    interval: int = 0  # steps between checkpoints; 0: none (the final weights are always saved)
    keep_last_k: int = 2  # 0 keeps every checkpoint
    resume: str = "auto"  # auto | none | run:<id> | path of a run directory


@dataclass
class LogSection:
    interval: int = 1  # steps between metrics lines
    tensorboard: bool = True  # write event files (needs the tensorboard package; warns once when it is missing)
    peak_flops: float = 0.0  # FLOP/s of one device for MFU; 0: look the device up in the table


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    lora: LoraSection = field(default_factory=LoraSection)
    moe: MoeSection = field(default_factory=MoeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    out: str = ""  # also write the final model (or adapter) here, besides the run's artifact

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- parsing --------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as TOML, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set {text!r} is not section.key=value", "e.g. --set train.steps=200")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [part.strip() for part in key.strip().split(".")], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {text!r}: {part} is not a section", "override a key inside a section")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] = (), base_dir: Path | None = None) -> tuple[TrainConfig, str]:
    """Read, override and validate a TOML config; returns the config and the file's text as given."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist", "give the path of a TOML file, e.g. examples/train/pretrain_tiny.toml")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}", "fix the syntax at the line shown") from None
    raw = apply_overrides(raw, list(overrides))
    config = from_dict(raw)
    resolve_paths(config, base_dir if base_dir is not None else path.parent)
    check(config)
    return config, text


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build the dataclasses, collecting every unknown key and wrong type (raises ValidationError)."""
    problems: list[str] = []
    config = _build(TrainConfig, raw, "", problems)
    if problems:
        raise ValidationError(problems, "config", "fix the config file or the --set values; `mlc train --help` lists the sections")
    return config


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a table, got {raw!r}")
        return cls()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            problems.append(f"unknown key {where}" + (f" (did you mean {prefix}{close[0]}?)" if close else f"; known: {', '.join(names)}"))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, f"{where}.", problems)
            continue
        ok, converted, expected = _coerce(hint, value)
        if ok:
            values[key] = converted
        else:
            problems.append(f"{where}: expected {expected}, got {value!r}")
    return cls(**values)


def _coerce(hint: Any, value: Any) -> tuple[bool, Any, str]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return value in choices, value, "one of " + ", ".join(repr(c) for c in choices)
    if origin in (list,):
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False, value, f"a list of {_name(item)}"
        out = []
        for v in value:
            ok, c, _ = _coerce(item, v)
            if not ok:
                return False, value, f"a list of {_name(item)}"
            out.append(c)
        return True, out, ""
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, c, _ = _coerce(arg, value)
            if ok:
                return True, c, ""
        return False, value, " or ".join(_name(a) for a in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    return isinstance(value, hint), value, _name(hint)


def _name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, getattr(hint, "__name__", str(hint)))


# ---- semantic checks ------------------------------------------------------------------------------------------
def resolve_paths(config: TrainConfig, base_dir: Path) -> None:
    """Make relative file paths relative to the config file's directory (so a recipe runs from anywhere)."""
    for section, key in (("model", "config"), ("model", "tokenizer"), ("data", "train"), ("data", "eval")):
        obj = getattr(config, section)
        value = getattr(obj, key)
        if value and not Path(value).expanduser().is_absolute() and not (Path.cwd() / value).exists():
            candidate = base_dir / value
            if candidate.exists():
                setattr(obj, key, str(candidate))
    init = config.model.init
    if init and not init.startswith(("run:", "latest:")) and not Path(init).expanduser().is_absolute() and not Path(init).exists():
        if (base_dir / init).exists():
            config.model.init = str(base_dir / init)


def check(config: TrainConfig) -> None:
    """Value ranges, the combinations that make sense, and every file the run will read (ValidationError)."""
    p: list[str] = []
    m, d, t, o, s = config.model, config.data, config.train, config.optim, config.schedule
    if bool(m.config) == bool(m.init):
        p.append("model.config / model.init: give exactly one (config: train from scratch; init: start from a trained model)")
    if m.config and not _config_json(Path(m.config)).is_file():
        p.append(f"model.config: {m.config} is not a config.json or a directory holding one")
    elif m.config:
        p.extend(_model_config_problems(_config_json(Path(m.config))))
    if m.init and not m.init.startswith(("run:", "latest:")) and not Path(m.init).expanduser().is_dir():
        p.append(f"model.init: {m.init} is not a model directory")
    if m.tokenizer and not (Path(m.tokenizer) / "tokenizer.json").is_file() and not Path(m.tokenizer).name == "tokenizer.json":
        p.append(f"model.tokenizer: no tokenizer.json in {m.tokenizer}")
    if not d.train:
        p.append("data.train: missing; give the training file (text for pretrain, chat JSONL for sft)")
    elif not Path(d.train).is_file():
        p.append(f"data.train: {d.train} does not exist")
    if d.eval and not Path(d.eval).is_file():
        p.append(f"data.eval: {d.eval} does not exist")
    if not 0.0 <= d.val_fraction < 1.0:
        p.append(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if not d.eval and d.val_fraction == 0.0 and config.eval.interval > 0:
        p.append("eval.interval: evaluation needs data.eval or data.val_fraction > 0")
    if d.seq_len < 2:
        p.append(f"data.seq_len: must be at least 2, got {d.seq_len}")
    for key in ("steps", "batch_size", "micro_batch_size"):
        if getattr(t, key) < 1:
            p.append(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    if t.batch_size >= 1 and t.micro_batch_size >= 1 and t.batch_size % t.micro_batch_size:
        p.append(f"train.batch_size: {t.batch_size} is not a multiple of train.micro_batch_size {t.micro_batch_size}")
    if t.grad_clip < 0:
        p.append(f"train.grad_clip: must be >= 0, got {t.grad_clip}")
    if o.lr <= 0:
        p.append(f"optim.lr: must be positive, got {o.lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas: expected two numbers in [0, 1), got {o.betas}")
    if s.warmup_steps < 0 or s.warmup_steps > t.steps:
        p.append(f"schedule.warmup_steps: must be between 0 and train.steps ({t.steps}), got {s.warmup_steps}")
    if not 0 <= s.min_lr_ratio <= 1:
        p.append(f"schedule.min_lr_ratio: must be in [0, 1], got {s.min_lr_ratio}")
    if not 0 < s.decay_fraction <= 1:
        p.append(f"schedule.decay_fraction: must be in (0, 1], got {s.decay_fraction}")
    if config.lora.enabled and (config.lora.r < 1 or not config.lora.target_modules):
        p.append("lora.r / lora.target_modules: LoRA needs r >= 1 and at least one target module")
    if config.lora.enabled and not m.init:
        p.append("lora.enabled: LoRA adapts a trained model; set model.init")
    for key in ("interval", "keep_last_k"):
        if getattr(config.checkpoint, key) < 0:
            p.append(f"checkpoint.{key}: must be >= 0")
    if config.out and Path(config.out).exists():
        p.append(f"out: {config.out} already exists; choose a new directory (the run's own artifact needs none)")
    if config.log.interval < 1:
        p.append(f"log.interval: must be at least 1, got {config.log.interval}")
    if config.moe.aux_loss_coef < 0 or config.moe.z_loss_coef < 0:
        p.append("moe.aux_loss_coef / moe.z_loss_coef: must be >= 0")
    if p:
        raise ValidationError(p, "config", "fix the config file or the --set values")


def _model_config_problems(path: Path) -> list[str]:
    import json

    from mlc.models import config_from_hf

    try:
        config_from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        return [f"model.config: {path} is not valid JSON (line {e.lineno})"]
    except (MlcError, KeyError, TypeError, ValueError) as e:
        text = e.one_line() if isinstance(e, MlcError) else f"{type(e).__name__}: {e}"
        return [f"model.config: {path} is not a model config ({text})"]
    return []


def _config_json(path: Path) -> Path:
    return path / "config.json" if path.is_dir() else path


def config_json_path(config: TrainConfig) -> Path:
    return _config_json(Path(config.model.config))


def check_world(config: TrainConfig, world_size: int) -> int:
    """Gradient-accumulation steps for this world size; the global batch stays the same on any world size."""
    per_step = config.train.micro_batch_size * world_size
    if config.train.batch_size % per_step:
        raise ValidationError(
            [f"train.batch_size: {config.train.batch_size} sequences cannot be split into micro-batches of "
             f"{config.train.micro_batch_size} over {world_size} processes"],
            "config",
            "make batch_size a multiple of micro_batch_size x processes",
        )
    return config.train.batch_size // per_step


def fingerprint(config: TrainConfig) -> str:
    """A hash of what defines the training trajectory (resume finds an interrupted run with the same one)."""
    import hashlib
    import json

    data = config.to_dict()
    data["checkpoint"] = {k: v for k, v in data["checkpoint"].items() if k != "resume"}
    data["log"] = {}
    # How the work is split does not change the trajectory: a DDP run may resume under FSDP2 and vice versa.
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("parallel", "compile")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
