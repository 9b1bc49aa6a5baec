"""Each merge method against an independent reference computed in float64 from its paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

from mlc import plugins
from mlc.commands.merge.api import merge_tensors


def method(name: str):
    return plugins.load_one("merge_methods", name)


def inputs(n: int = 3, shape: tuple[int, ...] = (40, 30), seed: int = 0, scale: float = 0.1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + scale * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def ref_topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density*n) largest |delta| (stable sort: equal magnitudes keep the lower index)."""
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(delta.shape)


def test_linear_is_the_normalised_weighted_average():
    _, xs = inputs()
    w = [0.2, 0.5, 1.3]
    got = merge_tensors("linear", [x.float() for x in xs], params={"weight": w})
    expected = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    raw = merge_tensors("linear", [x.float() for x in xs], params={"weight": w, "normalize": False})
    assert torch.allclose(raw.double(), sum(wi * x for wi, x in zip(w, xs)), atol=1e-5)


def test_task_arithmetic_adds_lambda_times_weighted_task_vectors():
    base, xs = inputs()
    w, lam = [0.5, -0.25, 1.0], 0.7
    got = merge_tensors("task_arithmetic", xs, base, {"weight": w, "lambda": lam})
    expected = base + lam * sum(wi * (x - base) for wi, x in zip(w, xs))
    assert torch.allclose(got, expected, atol=1e-12)
    normalized = merge_tensors("task_arithmetic", xs, base, {"weight": w, "normalize": True})
    assert torch.allclose(normalized, base + sum(wi * (x - base) for wi, x in zip(w, xs)) / sum(w), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_trims_elects_signs_and_averages_agreeing_entries(dtype):
    base, xs = inputs(shape=(12, 9))
    base, xs = base.to(dtype), [x.to(dtype) for x in xs]
    w, dens = [0.6, 1.0, 0.8], [0.5, 0.3, 0.7]
    got = merge_tensors("ties", xs, base, {"weight": w, "density": dens})
    # The paper's procedure, element by element, in float64.
    trimmed = []
    for x, d, wi in zip(xs, dens, w):
        delta = x.double() - base.double()
        trimmed.append(wi * delta * ref_topk_mask(delta, d))
    expected = torch.empty(base.shape, dtype=torch.float64)
    for idx in range(base.numel()):
        vals = [t.view(-1)[idx].item() for t in trimmed]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(v, wi) for v, wi in zip(vals, w) if v != 0 and math.copysign(1, v) == sign]
        num = sum(v for v, _ in agree)
        den = sum(wi for _, wi in agree) or 1.0
        expected.view(-1)[idx] = base.double().view(-1)[idx] + num / den
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert torch.allclose(got.double(), expected, atol=tol)


def test_ties_keeps_exactly_the_density_fraction_with_ties_broken_by_index():
    base = torch.zeros(10)
    x = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5, -2.0, 0.1, 3.0, 0.0, 1.0])
    got = merge_tensors("task_arithmetic", [x], base, {"weight": 1.0})
    assert torch.equal(got, x)
    # density 0.4 keeps 4 of 10: 3.0 and the first three of the four entries of magnitude 2.
    kept = merge_tensors("ties", [x], base, {"weight": 1.0, "density": 0.4})
    assert kept.tolist() == [0.0, -2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]


def test_breadcrumbs_drops_the_largest_gamma_and_the_smallest_entries():
    base = torch.zeros(20, dtype=torch.float64)
    x = torch.arange(1, 21, dtype=torch.float64) * torch.tensor([1.0, -1.0] * 10, dtype=torch.float64)
    got = merge_tensors("breadcrumbs", [x], base, {"weight": 1.0, "density": 0.5, "gamma": 0.1})
    # n=20: keep 10; drop the 2 largest (|19|, |20|) and the 8 smallest (|1|..|8|).
    keep = (x.abs() > 8) & (x.abs() <= 18)
    assert torch.equal(got, x * keep)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_drops_with_probability_1_minus_density_and_is_reproducible(name):
    base = torch.zeros(200, 200)
    x = torch.ones(200, 200)
    p = {"weight": 1.0, "density": 0.3, "rescale": False}
    a = merge_tensors(name, [x], base, p, seed=7)
    b = merge_tensors(name, [x], base, p, seed=7)
    c = merge_tensors(name, [x], base, p, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (a != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.01  # 40,000 Bernoulli(0.3) draws: sd 0.0023


def test_dare_rescaling_l1_by_default_and_inverse_density_as_in_the_paper():
    base = torch.zeros(100, 100, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100, 100, generator=g, dtype=torch.float64)
    l1 = merge_tensors("dare_linear", [x], base, {"weight": 1.0, "density": 0.2}, seed=1)
    assert l1.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-12)  # mergekit: restore ||d||_1
    paper = merge_tensors("dare_linear", [x], base, {"weight": 1.0, "density": 0.2, "rescale_mode": "inverse_keep"}, seed=1)
    kept = paper != 0
    assert torch.allclose(paper[kept], x[kept] / 0.2)  # the paper: survivors times 1/(1-p)


def test_della_keeps_large_magnitudes_more_often_around_the_mean_density():
    base = torch.zeros(400, 101, dtype=torch.float64)
    x = torch.arange(1, 102, dtype=torch.float64).expand(400, 101).clone()  # rank = column in every row
    got = merge_tensors("della_linear", [x], base, {"weight": 1.0, "density": 0.5, "epsilon": 0.3, "rescale": False}, seed=2)
    keep_rate = (got != 0).double().mean(0)
    # Probability rises linearly from density - eps (rank 0) to density + eps (last rank).
    expected = 0.2 + 0.6 * torch.arange(101, dtype=torch.float64) / 100
    assert (keep_rate - expected).abs().mean().item() < 0.02
    assert abs(keep_rate.mean().item() - 0.5) < 0.01


def test_slerp_follows_the_great_circle_between_base_and_model():
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    t = 0.3
    got = merge_tensors("slerp", [v1], v0, {"t": t})
    cos = (v0 / v0.norm()).dot(v1 / v1.norm())
    theta = math.acos(cos.item())
    expected = math.sin((1 - t) * theta) / math.sin(theta) * v0 + math.sin(t * theta) / math.sin(theta) * v1
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(merge_tensors("slerp", [v1], v0, {"t": 0.0}), v0)
    # Nearly parallel vectors interpolate linearly.
    assert torch.allclose(merge_tensors("slerp", [2 * v0], v0, {"t": 0.5}), 1.5 * v0)


def test_model_stock_interpolates_by_the_mean_pairwise_cosine():
    base, xs = inputs(n=3, shape=(64,))
    got = merge_tensors("model_stock", xs, base)
    offsets = [x - base for x in xs]
    cos = [a.dot(b) / (a.norm() * b.norm()) for i, a in enumerate(offsets) for b in offsets[i + 1 :]]
    c = sum(cos) / len(cos)
    t = 3 * c / (1 + 2 * c)
    expected = t * sum(xs) / 3 + (1 - t) * base
    assert torch.allclose(got, expected, atol=1e-12)


def test_passthrough_copies_and_scales():
    _, (x,) = inputs(n=1)
    assert torch.equal(merge_tensors("passthrough", [x]), x)
    assert torch.allclose(merge_tensors("passthrough", [x], params={"scale": 0.5}), 0.5 * x)


def test_calling_a_method_checks_parameters_and_leaves_inputs_untouched():
    base, xs = inputs()
    before = [x.clone() for x in xs]
    merge_tensors("ties", xs, base, {"weight": 1.0, "density": 0.5})
    assert all(torch.equal(a, b) for a, b in zip(xs, before))
    with pytest.raises(ValueError, match="density must be in"):
        merge_tensors("ties", xs, base, {"weight": 1.0, "density": 1.5})
    with pytest.raises(ValueError, match="needs parameter 'weight'"):
        merge_tensors("ties", xs, base, {})
    with pytest.raises(ValueError, match="needs a base"):
        merge_tensors("ties", xs, None, {"weight": 1.0})
    with pytest.raises(ValueError, match="did you mean 'density'"):
        merge_tensors("ties", xs, base, {"weight": 1.0, "desnity": 0.5})
