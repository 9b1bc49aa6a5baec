"""The demo's lifecycle, stage by stage: each stage is one real `mlc` command line.

    base      mlc train    pretrain the bundled tiny Llama from scratch on the bundled corpus (1 process)
    base-hf   mlc checkpoint convert   base's newest training checkpoint (DCP) to an HF directory
    base-lawa mlc checkpoint average   LAWA: the average of base's last 3 checkpoints, with perplexities
    chat      mlc train    fine-tune base on the bundled chat set, on 2 processes (torchrun, gloo): the distributed path
    merge     mlc merge    SLERP of base and chat (a mergekit YAML): keep chat skills, recover general text
    eval      mlc eval     held-out perplexity of base, chat and the merge
    quantize  mlc quantize int8 weight-only (compressed-tensors layout) with a perplexity report
    upcycle   mlc upcycle  the merge into a 4-expert top-2 Mixtral, then a few steps of `mlc train` on it
    serve     mlc serve    the quantised model behind the OpenAI API, asked one chat question by the openai client
    bench     mlc bench    a short `mlc bench serve` against that server: median TTFT, TPOT and output tokens/s
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlc import data


@dataclass
class Stage:
    name: str
    title: str
    argv: list[str]  # "@stage" stands for run:<id> of an earlier stage
    files: dict[str, Callable[[dict[str, str]], str]] = field(default_factory=dict)  # written into the work dir first


def toml_str(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def base_config(steps: int) -> str:
    return f"""
[model]
config = {toml_str(data.tiny_model_dir())}

[data]
mode = "pretrain"
train = {toml_str(data.corpus_path())}
eval = {toml_str(data.eval_text_path())}
seq_len = 128

[train]
steps = {steps}
batch_size = 16
micro_batch_size = 16
precision = "bf16"
seed = 0

[optim]
name = "adamw"
lr = 3e-3
weight_decay = 0.1

[schedule]
kind = "cosine"
warmup_steps = {max(1, steps // 10)}
min_lr_ratio = 0.1

[checkpoint]
interval = {checkpoint_interval(steps)}
keep_last_k = 3

[log]
interval = 5
tensorboard = false  # metrics.jsonl is the record; the base install has no tensorboard
"""


def checkpoint_interval(base_steps: int) -> int:
    """Base saves three checkpoints before its last step (the final weights are its artifact)."""
    return max(1, base_steps // 4)


def chat_config(steps: int, base_ref: str) -> str:
    return f"""
[model]
init = "{base_ref}"

[data]
mode = "sft"
train = {toml_str(data.chat_train_path())}
eval = {toml_str(data.chat_eval_path())}
seq_len = 128

[train]
steps = {steps}
batch_size = 16
micro_batch_size = 8
precision = "bf16"
parallel = "ddp"
seed = 1

[optim]
name = "adamw"
lr = 1e-3
weight_decay = 0.0

[schedule]
kind = "cosine"
warmup_steps = 2
warmup_start = 0.1
min_lr_ratio = 0.1

[log]
interval = 5
tensorboard = false  # metrics.jsonl is the record; the base install has no tensorboard
"""


def moe_config(steps: int, moe_dir: Path) -> str:
    return f"""
[model]
init = {toml_str(moe_dir)}

[data]
mode = "pretrain"
train = {toml_str(data.corpus_path())}
eval = {toml_str(data.eval_text_path())}
seq_len = 128

[train]
steps = {steps}
batch_size = 8
micro_batch_size = 8
precision = "bf16"
seed = 2

[optim]
name = "adamw"
lr = 1e-3

[schedule]
kind = "constant"
warmup_steps = 2

[moe]
aux_loss_coef = 0.02

[log]
interval = 2
tensorboard = false  # metrics.jsonl is the record; the base install has no tensorboard
"""


def merge_yaml(refs: dict[str, str]) -> str:
    base_ref, chat_ref = refs["base"], refs["chat"]
    return f"""# SLERP halfway between the pretrained base and its chat fine-tune.
merge_method: slerp
base_model: {base_ref}
models:
  - model: {base_ref}
  - model: {chat_ref}
parameters:
  t: 0.5
dtype: float32
"""


def lifecycle(work: Path, base_steps: int, chat_steps: int, moe_steps: int) -> list[Stage]:
    """The stages in order; references like latest:train resolve against the demo's runs root."""
    merged, quantized, moe = work / "merged", work / "merged-int8", work / "moe"
    eval_args = ["--data", str(data.eval_text_path()), "--context", "128", "--stride", "64"]
    return [
        Stage("base", "pretrain the tiny model (1 process)", ["train", str(work / "base.toml")], {"base.toml": lambda r: base_config(base_steps)}),
        Stage("base-hf", "base's newest checkpoint to HF", ["checkpoint", "convert", "@base", "--to", "hf", "--out", str(work / "base-checkpoint-hf")]),
        Stage(
            "base-lawa",
            "LAWA-average base's last 3 checkpoints",
            ["checkpoint", "average", "@base", "--last", "3", "--spacing", str(checkpoint_interval(base_steps)), "--out", str(work / "base-lawa"),
             "--eval", str(data.eval_text_path()), "--context", "128"],
        ),
        Stage(
            "chat",
            "chat fine-tune on 2 processes (torchrun + gloo)",
            ["train", str(work / "chat.toml"), "--nproc-per-node", "2"],
            {"chat.toml": lambda r: chat_config(chat_steps, r["base"])},
        ),
        Stage("merge", "SLERP-merge base and chat", ["merge", str(work / "merge.yml"), "--out", str(merged)], {"merge.yml": merge_yaml}),
        # Windows of the 128 tokens the demo trains on (longer ones would judge positions it never saw).
        Stage("eval-base", "held-out perplexity of base", ["eval", "@base", *eval_args]),
        Stage("eval-chat", "held-out perplexity of chat", ["eval", "@chat", *eval_args]),
        Stage("eval-merge", "held-out perplexity of the merge", ["eval", str(merged), *eval_args]),
        Stage("quantize", "int8 weight-only quantisation", ["quantize", str(merged), "--scheme", "int8", "--out", str(quantized)]),
        Stage("upcycle", "upcycle the merge to 4 experts, top-2", ["upcycle", str(merged), "--out", str(moe), "-E", "4", "-k", "2"]),
        Stage("moe-train", "train the MoE a few steps", ["train", str(work / "moe.toml")], {"moe.toml": lambda r: moe_config(moe_steps, moe)}),
    ]
