"""QLoRA: the NF4 base layer's input gradient equals the dense formula on its dequantised weight and keeps no dense
weight for the backward; on SmolLM2, QLoRA SFT lowers the held-out loss and its adapter loads with peft onto
transformers' model whose linear layers hold the same NF4 weights."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import DATA, mlc_train, train_runs, write_config
from .test_lora_sft import SEQ_LEN, held_out_loss, sft_config


def test_nf4_layer_gradients_follow_the_dequantised_weight_and_save_no_weight():
    from mlc.commands.train.qlora import Nf4Linear
    from mlc.kernels.codebook import quantize_codebook

    torch.manual_seed(0)
    dense = torch.nn.Linear(192, 320, bias=True)
    q = quantize_codebook(dense.weight.detach(), "nf4", 64)
    layer = Nf4Linear(q, dense.bias.detach())
    x = torch.randn(2, 5, 192, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    (y * torch.linspace(-1, 1, 320)).sum().backward()
    assert not saved  # nothing kept for the backward: it dequantises the weight again

    w = q.dequantize(torch.float64)  # the NF4 formula, in float64
    xr = x.detach().double().requires_grad_()
    yr = xr @ w.T + dense.bias.detach().double()
    (yr * torch.linspace(-1, 1, 320, dtype=torch.float64)).sum().backward()
    assert y.dtype == torch.float32 and not layer.bias.requires_grad
    # bf16 compute (the paper's compute dtype): relative to the size of the values
    assert (y.double() - yr).abs().max() < 2e-2 * yr.abs().max()
    assert (x.grad.double() - xr.grad).abs().max() < 2e-2 * xr.grad.abs().max()


@pytest.mark.realmodel
@pytest.mark.slow
def test_qlora_sft_lowers_held_out_loss_and_the_adapter_loads_with_peft(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlc.commands.train.batches import PackedSamples
    from mlc.commands.train.tokens import tokenize_file, tokenizer_hash
    from mlc.kernels.codebook import quantize_codebook
    from mlc.models.tokenizer import load_tokenizer

    runs = tmp_path / "runs"
    text = sft_config(smollm2_dir).replace("enabled = true", 'enabled = true\nbase = "nf4"').replace("steps = 6", "steps = 4")
    mlc_train(write_config(tmp_path, text), runs)
    (run,) = train_runs(runs)
    record = json.loads((run / "run.json").read_text())
    adapter = record["artifacts"]["adapter"]["path"]

    tokens = tokenize_file(DATA / "corpus" / "chat_eval.jsonl", "sft", load_tokenizer(smollm2_dir), tokenizer_hash(smollm2_dir), 49152)
    samples = PackedSamples(tokens, SEQ_LEN)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    quantised = 0
    for module in base.model.layers.modules():  # the base QLoRA trained on: every block linear in NF4
        if isinstance(module, torch.nn.Linear):
            module.weight.data = quantize_codebook(module.weight.data, "nf4", 64).dequantize(torch.float32)
            quantised += 1
    assert quantised == 7 * base.config.num_hidden_layers
    before = held_out_loss(base, samples)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    after = held_out_loss(tuned, samples)
    assert after < before - 0.05, (before, after)
    # mlc's own final evaluation (bf16) on the same sequences; transformers here in fp32
    assert after == pytest.approx(record["summary"]["eval_loss"], abs=0.05)
