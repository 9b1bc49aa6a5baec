"""DiLoCo's outer step and its uint8 pseudo-gradients against the papers' formulas, computed by hand (one process)."""

from __future__ import annotations

import pytest
import torch

from mlc.distributed.diloco import DiLoCo, dequantize_uint8, quantize_uint8


def test_uint8_codes_are_within_half_a_step_of_the_values():
    x = torch.randn(1000) * 3
    codes, low, step = quantize_uint8(x)
    assert codes.dtype == torch.uint8 and int(codes.min()) == 0 and int(codes.max()) == 255
    assert step == pytest.approx((x.max() - x.min()).item() / 255, rel=1e-6)
    assert (dequantize_uint8(codes, low, step) - x).abs().max().item() <= step / 2 + 1e-6
    same, low, _ = quantize_uint8(torch.full((4,), 2.5))  # a constant tensor: no division by zero
    assert dequantize_uint8(same, low, 1.0).tolist() == [2.5] * 4


def test_outer_nesterov_step_on_the_pseudo_gradient_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    lr, mu = 0.7, 0.9
    outer = DiLoCo(model, [opt], inner_steps=2, outer_lr=lr, outer_momentum=mu, quantize=False)
    theta0 = [p.detach().clone() for p in model.parameters()]

    def inner(shift: float) -> None:  # stands for the inner steps: the worker's weights move
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * shift)

    inner(0.1)
    assert not outer.after_step(1)  # between outer steps nothing is touched
    local1 = [p.detach().clone() for p in model.parameters()]
    inner(0.1)
    moved = [p.detach().clone() for p in model.parameters()]
    assert outer.after_step(2)
    expected1, momentum = [], []
    for t0, w in zip(theta0, moved):
        delta = t0 - w  # one worker: the mean pseudo-gradient is its own
        m = delta  # the first step: the momentum buffer is the gradient itself
        momentum.append(m)
        expected1.append(t0 - lr * (delta + mu * m))
    assert all(torch.allclose(p, e, atol=1e-7, rtol=0) for p, e in zip(model.parameters(), expected1))
    assert not all(torch.equal(a, b) for a, b in zip(local1, moved))

    inner(0.05)
    moved = [p.detach().clone() for p in model.parameters()]
    assert outer.after_step(4)
    for p, t1, w, m in zip(model.parameters(), expected1, moved, momentum):
        delta = t1 - w
        m2 = mu * m + delta
        assert torch.allclose(p, t1 - lr * (delta + mu * m2), atol=1e-7, rtol=0)
    assert outer.bytes_sent == 2 * 4 * sum(p.numel() for p in model.parameters())  # fp32, twice


def test_quantized_pseudo_gradients_cost_a_quarter_and_stay_within_the_rounding():
    torch.manual_seed(0)
    exact_model, q_model = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    q_model.load_state_dict(exact_model.state_dict())
    exact = DiLoCo(exact_model, [], inner_steps=1, outer_lr=1.0, outer_momentum=0.0, quantize=False)
    quant = DiLoCo(q_model, [], inner_steps=1, outer_lr=1.0, outer_momentum=0.0, quantize=True)
    shifts = [torch.randn_like(p) * 0.01 for p in exact_model.parameters()]
    with torch.no_grad():
        for m in (exact_model, q_model):
            for p, s in zip(m.parameters(), shifts):
                p.add_(s)
    exact.after_step(1)
    quant.after_step(1)
    n = sum(p.numel() for p in exact_model.parameters())
    assert exact.bytes_sent == 4 * n and quant.bytes_sent == n + 2 * 4 * 2  # uint8 codes + (min, step) per tensor
    for a, b, s in zip(exact_model.parameters(), q_model.parameters(), shifts):
        step = (s.max() - s.min()).item() / 255
        assert (a - b).abs().max().item() <= step / 2 + 1e-6
