"""The training config: TOML sections as pydantic models, `--set section.key=value` overrides, validation before work.

Every problem is collected and reported at once, each naming its key (`train.steps: expected an integer, got 'ten'`),
before a model is built or a token is read: the models check types, unknown keys ("did you mean") and ranges
(mlc.validation words pydantic's errors); `check` then checks what spans keys or reads the disk.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mlc.errors import InputError, MlcError, ValidationError
from mlc.validation import Strict, validate_all

AtLeast0 = Annotated[int, Field(ge=0)]
AtLeast1 = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


class ModelSection(BaseModel):
    model_config = Strict
    config: str = ""  # a config.json (or a directory holding one): pretrain from scratch
    init: str = ""  # an HF model directory or run reference: continue pretraining or fine-tune from it
    tokenizer: str = ""  # a directory with tokenizer.json; default: the model's own directory
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the weights the optimizer updates


class DataSection(BaseModel):
    model_config = Strict
    mode: Literal["pretrain", "sft", "dpo"] = "pretrain"
    # text (pretrain), chat JSONL with {"messages": [...]} per line (sft), or preference pairs (dpo: prompt/chosen/rejected)
    train: str = ""
    eval: str = ""  # held-out file of the same kind; empty: hold out val_fraction of train
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    seq_len: Annotated[int, Field(ge=2)] = 256
    shuffle: bool = True


class TrainSection(BaseModel):
    model_config = Strict
    steps: AtLeast1 = 100
    batch_size: AtLeast1 = 8  # sequences per optimizer step, over all processes
    micro_batch_size: AtLeast1 = 8  # sequences per forward pass on one process
    grad_clip: NonNegative = 1.0  # max global grad norm; 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast around forward and loss
    # how more than one process shares the work; diloco: local steps, an outer step every [diloco] inner_steps;
    # tp: tensor parallelism over groups of tp_size processes (FSDP2 across the groups when there are several)
    parallel: Literal["ddp", "fsdp", "diloco", "tp"] = "ddp"
    tp_size: AtLeast0 = 0  # processes per tensor-parallel group (parallel = "tp"); 0: all of them
    compile: bool = False  # torch.compile each transformer block
    seed: int = 0


class OptimSection(BaseModel):
    model_config = Strict
    # muon: Muon for 2-D hidden matrices, AdamW for the rest; galore: GaLore (2403.03507) for them instead
    name: Literal["adamw", "muon", "galore"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.95  # Muon's
    nesterov: bool = True  # Muon's
    ns_steps: int = 5  # Muon's Newton-Schulz iterations
    galore_rank: AtLeast1 = 128  # GaLore's projection rank (the paper's)
    galore_update_proj_gap: AtLeast1 = 200  # steps between GaLore's SVDs of the gradient
    galore_scale: Annotated[float, Field(gt=0)] = 0.25  # GaLore's scale of the projected-back update


class ScheduleSection(BaseModel):
    model_config = Strict
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: AtLeast0 = 0
    warmup_start: float = 0.0  # warm-up starts at lr * warmup_start (re-warming a trained model starts low)
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # cosine and WSD end at lr * min_lr_ratio
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2  # WSD: the last fraction of steps decays linearly


class LoraSection(BaseModel):
    model_config = Strict
    enabled: bool = False
    # nf4: QLoRA, the frozen base's linear layers held in 4-bit NormalFloat (mlc quantize's nf4), multiplied in bf16
    base: Literal["dense", "nf4"] = "dense"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Every projection; w1/w2/w3 are Mixtral's expert names (Qwen2-MoE experts reuse gate/up/down_proj).
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"]
    )


class MoeSection(BaseModel):
    model_config = Strict
    aux_loss_coef: NonNegative = 0.01  # Switch-style load-balancing loss; 0 disables
    z_loss_coef: NonNegative = 0.0  # router z-loss (ST-MoE); 0 disables


class DpoSection(BaseModel):
    model_config = Strict
    beta: Annotated[float, Field(gt=0)] = 0.1  # how far the policy may move from the reference (DPO's beta)


class AverageSection(BaseModel):
    model_config = Strict
    ema: bool = False  # keep an exponential moving average of the weights (Early Weight Averaging, 2306.03241)
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.999
    lawa_k: AtLeast0 = 0  # LAWA (2209.14981): average the k latest copies of the weights; 0: off
    lawa_interval: AtLeast1 = 100  # steps between LAWA's copies


class DilocoSection(BaseModel):
    """train.parallel = "diloco" (DiLoCo, 2311.08105, as INTELLECT-1 ran it): see mlc.distributed.diloco."""

    model_config = Strict
    inner_steps: AtLeast1 = 50  # H: optimizer steps each worker takes alone between two outer steps
    outer_lr: Annotated[float, Field(gt=0)] = 0.7  # the outer SGD's lr (both papers: 0.7)
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # its Nesterov momentum (both papers: 0.9)
    quantize: bool = True  # send pseudo-gradients as uint8 with a per-tensor scale (INTELLECT-1); false: fp32


class EvalSection(BaseModel):
    model_config = Strict
    interval: int = 0  # steps between evaluations; 0: only at the end
    max_sequences: int = 64  # held-out sequences per evaluation (all processes together; the first ones, fixed)


class CheckpointSection(BaseModel):
    model_config = Strict
    interval: AtLeast0 = 0  # steps between checkpoints; 0: none (the final weights are always saved)
    keep_last_k: AtLeast0 = 2  # 0 keeps every checkpoint
    resume: str = "auto"  # auto | none | run:<id> | path of a run directory
    # Copy the state to host memory and write it in the background: the loop waits only for the copy. Same files,
    # same crash safety (a step counts once its marker is written, after every rank's write finished).
    async_save: bool = False
    # In-memory snapshots (REFT): every k steps each rank's shard goes to a keeper process on its node that survives a
    # crash of the trainer, with XOR parity in the peers' keepers; a resume uses one newer than the disk checkpoints.
    snapshot_interval: AtLeast0 = 0  # steps between snapshots; 0: none
    snapshot_keep_s: Annotated[float, Field(gt=0)] = 600.0  # a keeper exits after this long with no trainer connected


class LogSection(BaseModel):
    model_config = Strict
    interval: AtLeast1 = 1  # steps between metrics lines
    tensorboard: bool = True  # write event files (needs the tensorboard package; warns once when it is missing)
    peak_flops: float = 0.0  # FLOP/s of one device for MFU; 0: look the device up in the table


class TrainConfig(BaseModel):
    model_config = Strict
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    moe: MoeSection = Field(default_factory=MoeSection)
    dpo: DpoSection = Field(default_factory=DpoSection)
    diloco: DilocoSection = Field(default_factory=DilocoSection)
    average: AverageSection = Field(default_factory=AverageSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    log: LogSection = Field(default_factory=LogSection)
    out: str = ""  # also write the final model (or adapter) here, besides the run's artifact

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({_position(e)})", "save the config file as UTF-8") from None
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
    """The validated config, or a ValidationError listing every unknown key, wrong type and value out of range."""
    config, found = validate_all(TrainConfig, raw)
    if config is None or found:
        raise ValidationError(found, "config", "fix the config file or the --set values; `mlc train --help` lists the sections")
    return config


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
    """The combinations of keys that make sense and every file the run will read (ValidationError)."""
    p: list[str] = []
    m, d, t, o, s = config.model, config.data, config.train, config.optim, config.schedule
    if bool(m.config) == bool(m.init):
        p.append("model.config / model.init: give exactly one (config: train from scratch; init: start from a trained model)")
    if m.config and not _config_json(Path(m.config)).is_file():
        p.append(f"model.config: {m.config} is not a config.json or a directory holding one")
    elif m.config:
        p.extend(_model_config_problems(_config_json(Path(m.config))))
    if m.init:
        p.extend(_init_problems(m.init))
    if m.tokenizer and not (Path(m.tokenizer) / "tokenizer.json").is_file() and not Path(m.tokenizer).name == "tokenizer.json":
        p.append(f"model.tokenizer: no tokenizer.json in {m.tokenizer}")
    if not d.train:
        p.append("data.train: missing; give the training file (text for pretrain, chat JSONL for sft)")
    elif not Path(d.train).is_file():
        p.append(f"data.train: {d.train} does not exist")
    else:
        p.extend(_utf8_problems("data.train", Path(d.train)))
    if d.eval and not Path(d.eval).is_file():
        p.append(f"data.eval: {d.eval} does not exist")
    elif d.eval:
        p.extend(_utf8_problems("data.eval", Path(d.eval)))
    if not d.eval and d.val_fraction == 0.0 and config.eval.interval > 0:
        p.append("eval.interval: evaluation needs data.eval or data.val_fraction > 0")
    if t.batch_size % t.micro_batch_size:
        p.append(f"train.batch_size: {t.batch_size} is not a multiple of train.micro_batch_size {t.micro_batch_size}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas: expected two numbers in [0, 1), got {o.betas}")
    if s.warmup_steps > t.steps:
        p.append(f"schedule.warmup_steps: must be between 0 and train.steps ({t.steps}), got {s.warmup_steps}")
    if config.lora.enabled and (config.lora.r < 1 or not config.lora.target_modules):
        p.append("lora.r / lora.target_modules: LoRA needs r >= 1 and at least one target module")
    if config.lora.base != "dense" and not config.lora.enabled:
        p.append(f"lora.base: {config.lora.base} holds the base of a LoRA run; set lora.enabled = true")
    if config.lora.base != "dense" and t.parallel == "fsdp":
        p.append(f"lora.base: a {config.lora.base} base is not sharded by FSDP; use train.parallel = \"ddp\"")
    if o.name == "galore" and t.parallel == "fsdp":
        p.append('optim.name: GaLore needs each matrix\'s whole gradient for its SVD, which FSDP shards; use train.parallel = "ddp"')
    if config.lora.enabled and not m.init:
        p.append("lora.enabled: LoRA adapts a trained model; set model.init")
    if t.tp_size and t.parallel != "tp":
        p.append(f'train.tp_size: applies only to train.parallel = "tp" (it is "{t.parallel}"); remove it or set parallel = "tp"')
    if t.parallel == "tp":
        p.extend(_tp_problems(config))
    if d.mode == "dpo" and not m.init:
        p.append("data.mode: DPO tunes a trained model (its starting weights are the reference); set model.init")
    if config.out and Path(config.out).exists():
        p.append(f"out: {config.out} already exists; choose a new directory (the run's own artifact needs none)")
    if p:
        raise ValidationError(p, "config", "fix the config file or the --set values")


def _tp_problems(config: TrainConfig) -> list[str]:
    """What tensor parallelism does not combine with: each of these needs whole weight matrices or plain tensors."""
    use = 'use train.parallel = "ddp" or "fsdp"'
    p = []
    if config.lora.enabled:
        p.append(f"lora.enabled: LoRA and QLoRA are not supported with train.parallel = \"tp\"; {use}")
    if config.optim.name != "adamw":
        p.append(f"optim.name: {config.optim.name} needs each weight matrix whole, which tensor parallelism splits; use adamw, or {use}")
    if config.average.ema or config.average.lawa_k:
        p.append(f"average.ema / average.lawa_k: weight averages are not kept under train.parallel = \"tp\"; {use}")
    if config.train.compile:
        p.append(f"train.compile: not supported with train.parallel = \"tp\"; set it to false, or {use}")
    return p


def tp_model_problems(model: Any, tp: int) -> list[str]:
    """Why a model (a ModelConfig) cannot be split over tp processes: each process takes whole heads and an equal
    slice of the MLP."""
    if tp == 1:
        return []
    if model.is_moe:
        return ["train.parallel: tensor parallelism covers dense models; this one has experts (use \"fsdp\")"]
    p = []
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(model, key) % tp:
            p.append(f"train.tp_size: the model's {key} ({getattr(model, key)}) is not divisible by {tp} processes per group")
    return p


def _init_problems(init: str) -> list[str]:
    """model.init must name a model directory with a config.json (a run reference is resolved to find it)."""
    from mlc.runs.refs import is_ref, resolve

    if is_ref(init):
        from mlc import options

        try:
            path = resolve(init, options.get().runs_dir).path
        except MlcError as e:
            return [f"model.init: {e.one_line()}"]
    else:
        path = Path(init).expanduser()
        if not path.exists() and init.count("/") == 1 and not init.startswith((".", "/", "~")):
            return []  # a Hub id (org/name): resolved through the Hub cache when the run starts
    if not path.is_dir():
        return [f"model.init: {init} is not a model directory"]
    if not (path / "config.json").is_file():
        return [f"model.init: {path} has no config.json (a model directory holds config.json and the weights)"]
    return []


def _utf8_problems(key: str, path: Path, chunk: int = 1 << 22) -> list[str]:
    """A data file that is not UTF-8, named with the line and byte where decoding stops (streamed: any size)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes and newlines before the current block
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            pending = decoder.getstate()[0]  # an incomplete character carried over from the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                where = _position(e, offset - len(pending), lines - pending.count(NEWLINE))
                return [f"{key}: {path} is not UTF-8 text ({where})"]
            if not block:
                return []
            offset += len(block)
            lines += block.count(NEWLINE)


NEWLINE = b"\n"


def _position(e: UnicodeDecodeError, base: int = 0, lines: int = 0) -> str:
    """Where a decode error is: its byte in the file (e.object starts at byte `base`), its line, the bad bytes."""
    data = e.object
    return f"byte {base + e.start}, line {lines + data.count(NEWLINE, 0, e.start) + 1}: {bytes(data[e.start:e.start + 4])!r}"


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


def known_model(config: TrainConfig) -> Any:
    """The ModelConfig when it can be read without resolving a run reference or the Hub (for checks before a launch)."""
    import json

    from mlc.models import config_from_hf

    path = config_json_path(config) if config.model.config else Path(config.model.init).expanduser() / "config.json"
    try:
        return config_from_hf(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, MlcError):  # checked again, with its own error, once the run starts
        return None


def tp_size(config: TrainConfig, world_size: int) -> int:
    """Processes per tensor-parallel group: train.tp_size, all of them when 0, 1 unless train.parallel = "tp"."""
    if config.train.parallel != "tp":
        return 1
    return config.train.tp_size or world_size


def check_world(config: TrainConfig, world_size: int, model: Any = None) -> int:
    """Gradient-accumulation steps for this world size; the global batch stays the same on any world size.

    Under tensor parallelism the batch is split over the TP groups, not the processes; `model` (a ModelConfig, when
    known) is checked to split over a group."""
    tp = tp_size(config, world_size)
    if world_size % tp:
        raise ValidationError(
            [f"train.tp_size: {world_size} processes cannot form groups of {tp}"], "config",
            "make the number of processes a multiple of train.tp_size",
        )
    if model is not None and (problems := tp_model_problems(model, tp)):
        raise ValidationError(problems, "config", "choose a train.tp_size that divides them")
    groups = world_size // tp
    per_step = config.train.micro_batch_size * groups
    if config.train.batch_size % per_step:
        over = f"{groups} tensor-parallel groups of {tp}" if tp > 1 else f"{world_size} processes"
        raise ValidationError(
            [f"train.batch_size: {config.train.batch_size} sequences cannot be split into micro-batches of "
             f"{config.train.micro_batch_size} over {over}"],
            "config",
            "make batch_size a multiple of micro_batch_size x processes" + (" / tp_size" if tp > 1 else ""),
        )
    return config.train.batch_size // per_step


def fingerprint(config: TrainConfig) -> str:
    """A hash of what defines the training trajectory (resume finds an interrupted run with the same one)."""
    import hashlib
    import json

    data = config.to_dict()
    data["checkpoint"] = {k: v for k, v in data["checkpoint"].items() if k not in ("resume", "async_save", "snapshot_interval", "snapshot_keep_s")}
    data["log"] = {}
    # How the work is split does not change the trajectory: a DDP run may resume under FSDP2 and vice versa.
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("parallel", "compile", "tp_size")}
    if config.train.parallel == "diloco":  # DiLoCo does change it (workers drift apart between outer steps)
        data["train"]["parallel"] = "diloco"
    else:
        data.pop("diloco")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
