"""mlc merge's default output is mergekit's, bit for bit, for every deterministic method.

Each config runs through both tools on the same tiny bf16 Llama-layout models and every output tensor
must have the same name, dtype, shape and bits. mergekit's own example YAMLs (its examples/ folder)
run unchanged but for the model names, on 40-layer models so their layer ranges hold. The `q*` models
differ from the base by a few multiples of 2^-7, so many task-vector entries have equal magnitudes:
TIES and Breadcrumbs must break those ties exactly as mergekit's sort does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from .mergekit_ref import Mergekit, assert_identical
from .tiny import llama_config, llama_tensors, perturb, save_model

VOCAB = [f"t{i}" for i in range(64)]


def bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.bfloat16() for k, v in tensors.items()}


def stepped(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """tensors + 2^-7 * {-3..3}: task vectors with few distinct magnitudes."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + torch.randint(-3, 4, v.shape, generator=g) * 2**-7).bfloat16() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("zoo")
    paths = {}
    cfg = {**llama_config(vocab=64, hidden=32, layers=4, inter=64, heads=4, kv=2), "torch_dtype": "bfloat16"}
    base = bf16(llama_tensors(cfg, seed=0))
    models = {"base": base, **{f"m{i}": bf16(perturb(base, i, scale=0.02)) for i in (1, 2, 3)}, **{f"q{i}": stepped(base, i) for i in (1, 2, 3)}}
    deep_cfg = {**llama_config(vocab=64, hidden=8, layers=40, inter=12, heads=2, kv=1), "torch_dtype": "bfloat16"}
    deep = bf16(llama_tensors(deep_cfg, seed=0))
    models_deep = {"deep_base": deep, **{f"deep{i}": bf16(perturb(deep, i, scale=0.02)) for i in (1, 2, 3)}}
    for name, tensors in models.items():
        paths[name] = str(save_model(root / name, cfg, tensors, VOCAB))
    for name, tensors in models_deep.items():
        paths[name] = str(save_model(root / name, deep_cfg, tensors, VOCAB))
    return paths


@pytest.fixture(scope="module")
def mergekit(tmp_path_factory: pytest.TempPathFactory) -> Mergekit:
    return Mergekit(tmp_path_factory.mktemp("mergekit"))


def with_paths(config: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """The config with each model name replaced by its directory."""

    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (paths[v] if k in ("model", "base_model") and isinstance(v, str) else sub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        return node

    return sub(copy.deepcopy(config))


def models(*entries: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": m, **({"parameters": p} if p else {})} for m, p in entries]


CONFIGS: dict[str, dict[str, Any]] = {
    "linear": {"merge_method": "linear", "models": models(("m1", {"weight": 0.5}), ("m2", {"weight": 0.3}), ("m3", {"weight": 0.2}))},
    "linear_unnormalized_f32": {
        "merge_method": "linear", "models": models(("m1", {"weight": 0.7}), ("m2", {"weight": [0.1, 0.9]})),
        "parameters": {"normalize": False}, "dtype": "float32",
    },
    # Compute in bf16, store float32: the result is rounded to bf16 first, as mergekit does.
    "linear_dtype_out_dtype": {
        "merge_method": "linear", "models": models(("m1", {"weight": 0.5}), ("m2", {"weight": 0.3}), ("m3", {"weight": 0.2})),
        "dtype": "bfloat16", "out_dtype": "float32",
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": models(("m1", {"weight": [0.2, 0.6]}), ("m2", {"weight": 0.4}), ("m3", {"weight": [{"filter": "mlp", "value": 0.3}, {"value": -0.1}]})),
        "parameters": {"lambda": 0.9},
    },
    "ties": {"merge_method": "ties", "base_model": "base", "models": models(*((f"q{i}", {"weight": w, "density": 0.5}) for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))))},
    "ties_rescale_lambda_f16": {
        "merge_method": "ties", "base_model": "base",
        "models": models(("q1", {"weight": 0.6, "density": [0.9, 0.2]}), ("q2", {"weight": 0.4, "density": 0.35})),
        "parameters": {"rescale": True, "lambda": 1.3, "normalize": False}, "dtype": "float16",
    },
    "ties_f32": {"merge_method": "ties", "base_model": "base", "models": models(("q1", {"weight": 1.0, "density": 0.3}), ("m2", {"weight": 0.5, "density": 0.7})), "dtype": "float32"},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base", "models": models(("q1", {"weight": 0.6}), ("q2", {"weight": 0.4})), "parameters": {"density": 0.8, "gamma": 0.05}},
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties", "base_model": "base",
        "models": models(("q1", {"weight": 0.6, "density": 0.5, "gamma": 0.1}), ("q3", {"weight": 0.4, "density": 0.9})),
    },
    "slerp": {
        "merge_method": "slerp", "base_model": "base",
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 4]}, {"model": "m1", "layer_range": [0, 4]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
    },
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": models(("m1", {}), ("m2", {}), ("m3", {}))},
    "model_stock_filter_wise_f32": {
        "merge_method": "model_stock", "base_model": "base", "models": models(("m1", {}), ("m2", {})), "parameters": {"filter_wise": True}, "dtype": "float32",
    },
    "nuslerp_task_vectors": {"merge_method": "nuslerp", "base_model": "base", "models": models(("m1", {"weight": 0.6}), ("m2", {"weight": 0.4}))},
    "nuslerp_row_wise_no_base": {
        "merge_method": "nuslerp", "models": models(("m1", {"weight": 1.0}), ("m3", {"weight": 3.0})),
        "parameters": {"nuslerp_row_wise": True, "nuslerp_flatten": False},
    },
    "multislerp_task_vectors": {"merge_method": "multislerp", "base_model": "base", "models": models(("m1", {"weight": 0.5}), ("m2", {"weight": 0.3}), ("m3", {"weight": 0.2}))},
    "multislerp_f32": {"merge_method": "multislerp", "models": models(("m1", {"weight": 2.0}), ("m2", {"weight": 1.0})), "parameters": {"normalize_weights": False}, "dtype": "float32"},
    "karcher": {"merge_method": "karcher", "models": models(("m1", {}), ("m2", {}), ("m3", {}))},
    "karcher_with_base_f32": {"merge_method": "karcher", "base_model": "base", "models": models(("m1", {}), ("m2", {})), "parameters": {"max_iter": 4, "tol": 1e-6}, "dtype": "float32"},
    "sce": {"merge_method": "sce", "base_model": "base", "models": models(("q1", {}), ("q2", {}), ("q3", {})), "parameters": {"select_topk": 0.6}},
    "sce_all_int8_mask_f32": {"merge_method": "sce", "base_model": "base", "models": models(("m1", {}), ("q2", {})), "parameters": {"int8_mask": True}, "dtype": "float32"},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "models": models(("base", {}), ("m2", {}))},
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "models": models(("m1", {})), "parameters": {"t": [0.005, 0.03]}},
    "ram": {"merge_method": "ram", "base_model": "base", "models": models(("q1", {}), ("q2", {}), ("q3", {}))},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "base", "models": models(("q1", {}), ("q2", {}), ("m3", {})), "parameters": {"r": 0.3, "alpha": 0.5}},
    "passthrough_scaled_slices": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "m1", "layer_range": [0, 3]}]},
            {"sources": [{"model": "m2", "layer_range": [1, 4], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
        ],
    },
}

# mergekit's examples/*.yml as shipped (arcee-ai/mergekit, LGPL-3.0), with each model name mapped to a tiny model.
EXAMPLES_DIR = Path(__file__).with_name("mergekit_examples")
EXAMPLE_MODELS = {
    "psmathur/orca_mini_v3_13b": "deep1", "garage-bAInd/Platypus2-13B": "deep2", "WizardLM/WizardLM-13B-V1.2": "deep3",
    "WizardLM/WizardMath-13B-V1.0": "deep3", "TheBloke/Llama-2-13B-fp16": "deep_base", "mistralai/Mistral-7B-v0.1": "deep_base",
    "mistralai/Mistral-7B-Instruct-v0.2": "deep1", "BioMistral/BioMistral-7B": "deep2", "model_a": "deep_base", "model_b": "deep1",
}


def run_both(config: dict[str, Any], mergekit: Mergekit, tmp_path: Path) -> tuple[Path, Path]:
    """(mlc's output, mergekit's output) for a config whose models are paths."""
    from mlc.commands.merge.api import run_merge

    out = tmp_path / "mlc"
    run_merge(config, out, runs_root=tmp_path / "runs")
    return out, mergekit.merge(config)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_default_output_is_mergekits_bit_for_bit(name, zoo, mergekit, tmp_path):
    got, want = run_both(with_paths(CONFIGS[name], zoo), mergekit, tmp_path)
    assert_identical(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES_DIR.glob("*.yml")))
def test_mergekits_own_examples_give_mergekits_output(example, zoo, mergekit, tmp_path):
    config = yaml.safe_load((EXAMPLES_DIR / example).read_text())
    got, want = run_both(with_paths(config, {k: zoo[v] for k, v in EXAMPLE_MODELS.items()}), mergekit, tmp_path)
    assert_identical(got, want)


def mergekit_method(name: str) -> Any:
    pytest.importorskip("mergekit", reason="mergekit (the reference) is in the dev extra")
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    method = merge_methods.get(name)

    def run(base: torch.Tensor, xs: list[torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
        (out,) = method((TensorGroup.from_tensors([base, *xs], base_index=0),), parameters=params)
        return out

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,params",
    [
        ("dare_linear", {"weight": [0.6, 0.4], "density": [0.3, 0.6]}),
        ("dare_ties", {"weight": [0.6, 0.4], "density": [0.5, 0.5]}),
        ("della", {"weight": [0.6, 0.4], "density": [0.4, 0.6], "epsilon": [0.2, 0.1]}),
        ("della_linear", {"weight": [0.6, 0.4], "density": [0.4, 0.6], "epsilon": [0.2, 0.1], "rescale": False}),
    ],
)
def test_random_methods_have_mergekits_expectation(name, params):
    """Over 150 seeds, the mean merged tensor of each tool agrees element by element within sampling error (mean z^2 ~ 1)."""
    from mlc.commands.merge.api import merge_tensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 40, generator=g)
    xs = [base + 0.05 * torch.randn(48, 40, generator=g) for _ in range(2)]
    reference = mergekit_method(name)
    draws = 150
    ours = torch.stack([merge_tensors(name, xs, base, params, seed=s).double() for s in range(draws)])
    theirs = []
    for s in range(draws):
        torch.manual_seed(10_000 + s)
        theirs.append(reference(base, xs, params).double())
    theirs = torch.stack(theirs)
    se2 = ours.var(0) / draws + theirs.var(0) / draws
    z2 = (ours.mean(0) - theirs.mean(0)).square() / se2.clamp_min(1e-30)
    assert 0.85 < float(z2.mean()) < 1.2  # chi-square with 1 degree of freedom per element: mean 1, sd 0.03 over 1920 entries


def test_dare_draws_average_to_the_unpruned_task_vectors_and_l1_rescaling_keeps_each_draws_norm():
    from mlc.commands.merge.api import merge_tensors

    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 64, generator=g, dtype=torch.float64)
    x = base + 0.1 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    unbiased = {"weight": 1.0, "density": 0.4, "rescale_mode": "inverse_keep"}
    draws = torch.stack([merge_tensors("dare_linear", [x], base, unbiased, seed=s) for s in range(400)])
    z = (draws.mean(0) - x) / (draws.std(0) / 20).clamp_min(1e-12)
    assert 0.85 < float(z.square().mean()) < 1.15
    for s in range(5):
        pruned = merge_tensors("dare_linear", [x], base, {"weight": 1.0, "density": 0.4}, seed=s) - base
        assert float(pruned.abs().sum()) == pytest.approx(float((x - base).abs().sum()), rel=1e-12)
        assert 0.3 < float((pruned != 0).double().mean()) < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "task_arithmetic", "ties_rescale_lambda_f16", "ties_f32"])
def test_without_the_c_kernels_the_torch_path_gives_the_same_bits(name, zoo, mergekit, tmp_path, monkeypatch):
    from mlc.commands.merge import native

    monkeypatch.setattr(native, "library", lambda: None)
    got, want = run_both(with_paths(CONFIGS[name], zoo), mergekit, tmp_path)
    assert_identical(got, want)
