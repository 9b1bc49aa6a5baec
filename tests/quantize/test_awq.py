"""AWQ: the scales it folds keep the model's function, and they cut the output error of a layer with outlier inputs.

References: the unquantised transformers model (folding scales into norms and feeding Linears must not change
its logits), and the output error measured on the activations themselves, ||X W^T - X Q(W s)^T / s||, not on the
X^T X statistic the search uses.
"""

from __future__ import annotations

import pytest
import torch

from mlc.commands.quantize.awq import search_scales, smooth_block
from mlc.commands.quantize.rtn import quantize_int


def _quantize(w: torch.Tensor) -> torch.Tensor:
    return quantize_int(w, 4, 32, True).dequantize()


def test_awq_scales_cut_the_output_error_of_outlier_input_channels_and_report_it_truly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g)
    x[:, :4] *= 25.0  # a few input channels carry large activations, as in LLMs
    w = torch.randn(192, 256, generator=g) * 0.05
    h = x.T @ x / x.shape[0]

    def error(s: torch.Tensor) -> float:
        return float((x @ w.T - x @ (_quantize(w * s) / s).T).pow(2).sum())

    s, ratio, gain = search_scales([w], [h], x.abs().mean(0), _quantize)
    assert error(s) < 0.8 * error(torch.ones(256))  # 0.71x here
    assert gain == pytest.approx(error(s) / error(torch.ones(256)), rel=1e-3)
    assert 0 <= ratio < 1


@pytest.mark.parametrize("kv_heads", [4, 2])  # without GQA v_proj -> o_proj is scaled too; with it, skipped
def test_folding_the_scales_keeps_the_unquantised_model_exactly(kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # non-trivial norms too
    prefix = "model.layers.0."
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in linears]
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    for hook in hooks:
        hook.remove()
    stats = {}
    for n, xs in inputs.items():
        x = torch.cat(xs)
        stats[n] = (x.T @ x / x.shape[0], x.abs().mean(0))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    changed, chosen = smooth_block(prefix, lambda n: state[n].float(), lambda n: n in state, stats, linears, 4, 32, True)
    folded_into = {f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight", f"{prefix}mlp.up_proj.weight"}
    if kv_heads == 4:
        folded_into.add(f"{prefix}self_attn.v_proj.weight")
    assert folded_into <= set(changed)
    assert (f"{prefix}self_attn.v_proj" in chosen) == (kv_heads == 4)
    model.load_state_dict(changed, strict=False)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max().item() < 1e-4 * before.abs().max().item()
    assert any((changed[n] - state[n]).abs().max() > 1e-3 for n in folded_into)  # it did scale something


def test_awq_option_checks(run_mlc_module, small_model_dir, tmp_path):
    code, _, err = run_mlc_module("quantize", small_model_dir, "--scheme", "awq", "--bits", "3", "--out", tmp_path / "a")
    assert code == 2 and "--bits 4 or 8" in err
    code, _, err = run_mlc_module("quantize", small_model_dir, "--scheme", "awq", "--bits", "8", "--group-size", "32", "--out", tmp_path / "b")
    assert code == 2 and "group-size" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_awq_output_carries_the_scaled_norms_and_says_what_it_chose(outputs, small_model_dir):
    from safetensors.torch import load_file

    out, report = outputs["awq"]
    written = {}
    for f in out.glob("*.safetensors"):
        written |= load_file(f)
    original = load_file(next(small_model_dir.glob("*.safetensors")))
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(written[norm].float(), original[norm].float())
    assert report["plan"]["smoothed"]["model.layers.0.input_layernorm"]["error_vs_rtn"] <= 1.0
