"""LoRA round trips through real PEFT: folding equals PEFT's own merge, extraction loads in PEFT and
reproduces the fine-tune, and several adapters combine with a merge method before folding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from . import reference as ref
from .tiny import load

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lora") / "base"
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(path)
    return path


def make_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT adapter with random (non-zero) A and B, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_folding_an_adapter_equals_peft_merge_and_unload(run_mlc, base_dir, tmp_path, rslora):
    adapter = make_adapter(base_dir, tmp_path / "adapter", seed=1, use_rslora=rslora)
    code, _, err = run_mlc("merge", "lora", base_dir, adapter, "--out", tmp_path / "folded")
    assert code == 0, err
    got, expected = load(tmp_path / "folded"), peft_merged(base_dir, adapter)
    assert set(got) == set(expected)
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k
    base = load(base_dir)
    assert not torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_two_adapters_combine_linearly_or_with_ties_before_folding(run_mlc, base_dir, tmp_path):
    a1 = make_adapter(base_dir, tmp_path / "a1", seed=1)
    a2 = make_adapter(base_dir, tmp_path / "a2", seed=2)
    w1, w2 = peft_merged(base_dir, a1), peft_merged(base_dir, a2)
    base = {k: v.double() for k, v in load(base_dir).items()}
    code, _, err = run_mlc("merge", "lora", base_dir, a1, a2, "--method", "linear", "--weights", "0.25,0.75", "--out", tmp_path / "lin")
    assert code == 0, err
    lin = load(tmp_path / "lin")
    for k in base:
        assert torch.allclose(lin[k].double(), 0.25 * w1[k].double() + 0.75 * w2[k].double(), atol=1e-5), k
    code, _, err = run_mlc("merge", "lora", base_dir, a1, a2, "--method", "ties", "--density", "0.5", "--out", tmp_path / "ties")
    assert code == 0, err
    ties = load(tmp_path / "ties")
    q = "model.layers.0.self_attn.q_proj.weight"
    expected = ref.ties(base[q], [w1[q].double(), w2[q].double()], [0.5, 0.5], [0.5, 0.5])
    assert torch.allclose(ties[q].double(), expected, atol=1e-5)
    # Tensors no adapter touches are copied unchanged.
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(ties[k], load(base_dir)[k])


def test_extracted_lora_loads_in_peft_and_reproduces_a_low_rank_fine_tune(run_mlc, base_dir, tmp_path):
    """tuned = base + an exact rank-3 delta on some weights: a rank-3 extraction recovers it."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = load(base_dir)
    g = torch.Generator().manual_seed(4)
    tuned = dict(base)
    for k in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight", "lm_head.weight", "model.embed_tokens.weight"]:
        out_dim, in_dim = base[k].shape
        tuned[k] = base[k] + 0.1 * torch.randn(out_dim, 3, generator=g) @ torch.randn(3, in_dim, generator=g)
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    (tuned_dir / "config.json").write_text((base_dir / "config.json").read_text())
    save_file(tuned, str(tuned_dir / "model.safetensors"))
    code, _, err = run_mlc("merge", "extract-lora", base_dir, tuned_dir, "--rank", "3", "--out", tmp_path / "adapter")
    assert code == 0, err
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    reference = AutoModelForCausalLM.from_pretrained(tuned_dir)
    ids = torch.tensor([[1, 5, 9, 33, 60]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
    merged = model.merge_and_unload().state_dict()
    for k in tuned:
        assert torch.allclose(merged[k], tuned[k], atol=1e-5), k
    # A lower rank than the delta's is the best rank-r approximation: error = the dropped singular values.
    code, out, _ = run_mlc("--json", "merge", "extract-lora", base_dir, tuned_dir, "--rank", "1", "--out", tmp_path / "r1")
    import json

    report = json.loads(out)["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    d = tuned["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]
    s = torch.linalg.svdvals(d.double())
    assert report["relative_error"] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)


def test_fold_validation_lists_every_problem(run_mlc, base_dir, tmp_path):
    a1 = make_adapter(base_dir, tmp_path / "a1", seed=1)
    (tmp_path / "empty").mkdir()
    code, _, err = run_mlc("merge", "lora", base_dir, a1, tmp_path / "empty", "--method", "ties", "--density", "1.5", "--out", tmp_path / "o")
    assert code == 1
    assert "empty is not a PEFT adapter" in err and "density must be in (0, 1]" in err
    assert not (tmp_path / "o").exists()
