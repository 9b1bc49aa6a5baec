"""Drop-Upcycling: per expert, a fraction r of the intermediate neurons is re-drawn from N(mean, std) of the
dense matrix (rows of gate/up, columns of down); the rest is an exact copy; the draws are seeded."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlc.commands.upcycle.layout import expert_name

from .upcycle_helpers import upcycle

RATIO = 0.5
EXPERTS = 4


@pytest.fixture(scope="module")
def skewed_base(tiny_llama, tmp_path_factory):
    """The tiny Llama with MLP weights of distinct, non-zero means and spreads, so that drawing from the
    wrong statistics (say N(0, 0.02)) would show."""
    path = tmp_path_factory.mktemp("skewed") / "base"
    shutil.copytree(tiny_llama, path)
    tensors = load_file(str(path / "model.safetensors"))
    for name in list(tensors):
        if ".mlp.gate_proj" in name:
            tensors[name] = tensors[name] + 0.3
        elif ".mlp.up_proj" in name:
            tensors[name] = tensors[name] * 3.0
        elif ".mlp.down_proj" in name:
            tensors[name] = tensors[name] - 0.2
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def dropped(skewed_base, tmp_path_factory):
    from mlc import options

    saved = options.get()
    options.set_options(options.GlobalOptions(runs_dir=tmp_path_factory.mktemp("runs")))
    try:
        out = upcycle(skewed_base, tmp_path_factory.mktemp("out") / "moe", experts=EXPERTS, top_k=2, drop_ratio=RATIO, seed=7)
    finally:
        options.set_options(saved)
    return load_file(str(skewed_base / "model.safetensors")), load_file(str(out / "model.safetensors"))


def changed_neurons(dense: torch.Tensor, expert: torch.Tensor, proj: str) -> torch.Tensor:
    """Indices of the neurons (rows, or columns of down) where the expert differs from the dense copy."""
    differs = (dense != expert)
    return torch.nonzero(differs.any(dim=0 if proj == "down" else 1)).flatten()


def test_each_expert_reinitialises_the_same_half_of_its_neurons_in_gate_up_and_down(dropped):
    dense, moe = dropped
    sets = []
    for layer in range(2):
        for e in range(EXPERTS):
            per_proj = {}
            for proj in ("gate", "up", "down"):
                d = dense[f"model.layers.{layer}.mlp.{proj}_proj.weight"]
                x = moe[expert_name("mixtral", layer, e, proj)]
                per_proj[proj] = changed_neurons(d, x, proj)
                # a re-drawn neuron is re-drawn whole: every value of its row (column) changed
                rows = x.index_select(1 if proj == "down" else 0, per_proj[proj])
                old = d.index_select(1 if proj == "down" else 0, per_proj[proj])
                assert (rows != old).all()
            assert len(per_proj["gate"]) == RATIO * 64  # intermediate size 64: exactly round(r * I) neurons
            assert torch.equal(per_proj["gate"], per_proj["up"]) and torch.equal(per_proj["gate"], per_proj["down"])
            sets.append(set(per_proj["gate"].tolist()))
    assert len({frozenset(s) for s in sets}) == len(sets)  # every expert of every layer drops its own neurons


def test_new_values_follow_the_mean_and_std_of_the_original_matrix(dropped):
    dense, moe = dropped
    for proj in ("gate", "up", "down"):
        z = []
        for layer in range(2):
            d = dense[f"model.layers.{layer}.mlp.{proj}_proj.weight"].double()
            for e in range(EXPERTS):
                x = moe[expert_name("mixtral", layer, e, proj)].double()
                fresh = x[d != x]
                z.append((fresh - d.mean()) / d.std())  # standardised by the original matrix's statistics
        z = torch.cat(z)
        n = z.numel()  # 8 experts-layers x 32 neurons x 32 = 8192 values per projection
        assert abs(z.mean().item()) < 4 / n**0.5, proj
        assert abs(z.std().item() - 1) < 0.05, proj


def test_the_same_seed_gives_the_same_model_and_another_seed_another(skewed_base, tmp_path, runs_root):
    a = upcycle(skewed_base, tmp_path / "a", drop_ratio=RATIO, seed=3)
    b = upcycle(skewed_base, tmp_path / "b", drop_ratio=RATIO, seed=3)
    c = upcycle(skewed_base, tmp_path / "c", drop_ratio=RATIO, seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_ratio_one_redraws_every_neuron_and_ratio_zero_none(skewed_base, tmp_path, runs_root):
    dense = load_file(str(skewed_base / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    full = load_file(str(upcycle(skewed_base, tmp_path / "full", experts=2, top_k=1, drop_ratio=1.0) / "model.safetensors"))
    none = load_file(str(upcycle(skewed_base, tmp_path / "none", experts=2, top_k=1, drop_ratio=0.0) / "model.safetensors"))
    assert (full[expert_name("mixtral", 0, 1, "up")] != dense).all()
    assert torch.equal(none[expert_name("mixtral", 0, 1, "up")], dense)


def test_the_shared_expert_keeps_the_dense_mlp_while_routed_experts_drop(skewed_base, tmp_path, runs_root):
    dense = load_file(str(skewed_base / "model.safetensors"))
    moe = load_file(str(upcycle(skewed_base, tmp_path / "moe", experts=2, top_k=1, shared_expert=True, drop_ratio=RATIO) / "model.safetensors"))
    for proj in ("gate", "up", "down"):
        d = dense[f"model.layers.1.mlp.{proj}_proj.weight"]
        assert torch.equal(moe[f"model.layers.1.mlp.shared_expert.{proj}_proj.weight"], d)
        routed = moe[expert_name("qwen2_moe", 1, 0, proj)]
        if proj == "down":
            routed = routed * 2  # the routed half of the dense function (exact: a power of two)
        assert len(changed_neurons(d, routed, proj)) == RATIO * 64
