"""MoE models merge expert by expert (expert i with expert i, router with router): Mixtral and Qwen2-MoE
checkpoints as transformers saves them, against the per-tensor formula, against mergekit (Mixtral, linear),
and in transformers afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from . import reference as ref
from .tiny import load


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.conftest import save_tiny_hf_model

    root = tmp_path_factory.mktemp("moe")
    made = {}
    for kind in ("mixtral", "qwen2_moe"):
        for seed in (0, 1, 2):
            made[f"{kind}{seed}"] = save_tiny_hf_model(kind, root / f"{kind}{seed}", seed=seed)
    made["mixtral_2experts"] = save_tiny_hf_model("mixtral", root / "mixtral_2experts", seed=3, num_local_experts=2)
    return made


def run(run_mlc, tmp_path: Path, config: dict, name: str) -> tuple[int, str, Path]:
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / name
    code, _, err = run_mlc("merge", tmp_path / f"{name}.yml", "--out", out)
    return code, err, out


@pytest.mark.slow
@pytest.mark.parametrize("kind,experts", [("mixtral", "block_sparse_moe.experts.3.w2.weight"), ("qwen2_moe", "mlp.experts.3.down_proj.weight")])
def test_ties_merges_each_expert_and_the_router_with_its_counterpart(kind, experts, moe, run_mlc, tmp_path):
    models = [load(moe[f"{kind}{s}"]) for s in (0, 1, 2)]
    config = {
        "merge_method": "ties", "base_model": str(moe[f"{kind}0"]), "dtype": "float32",
        "models": [{"model": str(moe[f"{kind}{s}"]), "parameters": {"weight": w, "density": 0.5}} for s, w in ((1, 0.6), (2, 0.4))],
    }
    code, err, out = run(run_mlc, tmp_path, config, kind)
    assert code == 0, err
    got = load(out)
    assert sorted(got) == sorted(models[0])  # the same per-expert tensors, router included
    assert f"model.layers.0.{experts}" in got and any(".gate.weight" in n for n in got)
    b, x1, x2 = ({k: v.double() for k, v in m.items()} for m in models)
    for name, t in got.items():  # each tensor's top-k is its own: expert by expert, not over a fused stack
        expected = ref.ties(b[name], [x1[name], x2[name]], [0.6, 0.4], [0.5, 0.5])
        assert torch.allclose(t.double(), expected, atol=1e-6), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape[-1] == 128 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_a_mixtral_linear_merge_is_mergekits_in_transformers(moe, run_mlc, tmp_path):
    from transformers import AutoModelForCausalLM

    from .mergekit_ref import Mergekit

    mergekit = Mergekit(tmp_path / "mergekit")
    config = {"merge_method": "linear", "models": [{"model": str(moe[f"mixtral{s}"]), "parameters": {"weight": w}} for s, w in ((0, 0.2), (1, 0.5), (2, 0.3))]}
    code, err, out = run(run_mlc, tmp_path, config, "linear")
    assert code == 0, err
    # mergekit writes transformers 5's fused expert tensors, mlc the per-expert tensors it read: both load as the same model.
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(mergekit.merge(config), dtype=torch.float32).state_dict()
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_moe_models_with_different_expert_counts_are_refused_in_one_line(moe, run_mlc, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(moe[m]), "parameters": {"weight": 0.5}} for m in ("mixtral0", "mixtral_2experts")]}
    code, err, out = run(run_mlc, tmp_path, config, "bad")
    assert code == 1 and not out.exists()
    text = " ".join(err.split())
    assert "MoE models merge expert by expert and need the same number of experts" in text and ": 4," in text and ": 2)" in text
    assert err.count("\n  - ") <= 2, err  # the count, and (at most) one line for the tensors the smaller model lacks
