"""The final weights as an artifact: an HF model directory (full training) or a peft adapter directory (LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mlc.commands.train.config import TrainConfig
from mlc.commands.train.model import causal_lm
from mlc.distributed import dist as mdist
from mlc.models import CausalLM, save_model
from mlc.runs import Run


def export_final(
    model: nn.Module, config: TrainConfig, run: Run | None, info: mdist.DistInfo, tokenizer_dir: Path, init_dir: Path | None,
    average: str = "",
) -> Path | None:
    """Gather the full weights onto rank 0 (a collective: every rank calls it) and write the artifact there.

    average: "" for the trained weights (artifact `model` or `adapter`, also written to config.out), or the name of
    the weight average the model holds now (artifact `model-ema`, `adapter-lawa`, ...).
    """
    lora = config.lora.enabled
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    state = get_model_state_dict(model, options=options)
    path = None
    if run is not None:
        name = ("adapter" if lora else "model") + (f"-{average}" if average else "")
        out = (config.out or None) if not average else None
        meta = {"steps": config.train.steps, "mode": config.data.mode, "lora": lora, "average": average or None}
        with run.artifact(name, kind="adapter" if lora else "model", out=out, overwrite=out is None, meta=meta) as staging:
            if lora:
                _save_adapter(model, state, staging, init_dir)
            else:
                _save_model(model, state, staging, tokenizer_dir)
        path = Path(run.data["artifacts"][name]["path"])
    mdist.barrier()
    return path


def _save_model(model: nn.Module, state: dict[str, torch.Tensor], out: Path, tokenizer_dir: Path) -> None:
    cfg = causal_lm(model).config
    with torch.device("meta"):
        fresh = CausalLM(cfg)
    fresh.load_state_dict(state, strict=False, assign=True)
    fresh.tie_weights()
    save_model(fresh, out, tokenizer_from=tokenizer_dir)


def _save_adapter(model: nn.Module, state: dict[str, torch.Tensor], out: Path, init_dir: Path | None) -> None:
    """A peft adapter directory that PeftModel.from_pretrained loads onto transformers' model of the base."""
    peft_model = getattr(model, "module", model)
    peft_model.save_pretrained(str(out), state_dict=state)
    config_file = out / "adapter_config.json"
    adapter = json.loads(config_file.read_text())
    # Trained without a task type (the native forward), but it is a causal-LM adapter for transformers' classes.
    adapter.update(task_type="CAUSAL_LM", base_model_name_or_path=str(init_dir) if init_dir else None)
    adapter.pop("auto_mapping", None)
    config_file.write_text(json.dumps(adapter, indent=2) + "\n")
