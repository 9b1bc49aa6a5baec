"""GaLore: the same updates as the reference package (galore-torch's GaLoreAdamW) across a projection refresh, a
resume through DCP that continues bitwise, the split of parameters, and optimizer state against AdamW's."""

from __future__ import annotations

import warnings

import pytest
import torch

from mlc.commands.train.config import OptimSection
from mlc.commands.train.galore import GaLoreAdamW, state_bytes
from mlc.commands.train.optim import build_optimizers
from mlc.models import build_model

from .test_optim import TINY

SHAPES = [(24, 10), (10, 24)]  # both projections: right (m >= n) and left


def matrices(seed: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]


def run(params, opt, first: int, last: int) -> None:
    for step in range(first, last + 1):
        torch.manual_seed(1000 + step)  # the same gradients whoever runs the step
        for p in params:
            p.grad = torch.randn_like(p) + 0.1 * p.detach()
        opt.step()


@pytest.mark.slow  # importing galore-torch imports transformers
def test_updates_match_the_galore_torch_reference():
    from galore_torch import GaLoreAdamW as Reference

    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    ours, theirs = matrices(0), matrices(0)
    opt = GaLoreAdamW(ours, rank=4, update_proj_gap=3, scale=0.25, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = Reference([{"params": theirs, "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}], **kwargs)
    start = [p.detach().clone() for p in ours]
    run(ours, opt, 1, 7)  # projections refreshed at steps 1, 4 and 7
    run(theirs, ref, 1, 7)
    for a, b, s in zip(ours, theirs, start):
        assert (a - b).abs().max() < 1e-5 and (a - s).abs().max() > 1e-3
    for p, shape in zip(ours, SHAPES):
        state = opt.state[p]
        assert state["exp_avg"].shape == ((24, 4) if shape[0] >= shape[1] else (4, 24))


def test_resume_through_dcp_continues_bitwise(tmp_path):
    from mlc.distributed.checkpoint import CheckpointManager, TrainState

    model = torch.nn.ParameterList(matrices(0))
    opt = GaLoreAdamW(list(model.parameters()), lr=1e-2, rank=4, update_proj_gap=3, scale=0.25)
    run(list(model.parameters()), opt, 1, 5)
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(5, TrainState(model, [opt]), {"consumed_samples": 5})
    run(list(model.parameters()), opt, 6, 9)  # crosses the refresh at step 7

    other = torch.nn.ParameterList(matrices(1))
    other_opt = GaLoreAdamW(list(other.parameters()), lr=1e-2, rank=4, update_proj_gap=3, scale=0.25)
    manager.load(manager.latest(), TrainState(other, [other_opt]))
    run(list(other.parameters()), other_opt, 6, 9)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))


def test_galore_takes_hidden_matrices_and_keeps_less_state_than_adamw():
    model = build_model(dict(TINY))
    galore, adamw = build_optimizers(model, OptimSection(name="galore", galore_rank=4))
    assert isinstance(galore, GaLoreAdamW) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_galore = {names[id(p)] for g in galore.param_groups for p in g["params"]}
    assert on_galore == {n for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for opt in (galore, adamw):
        opt.step()
    plain = build_optimizers(build_model(dict(TINY)), OptimSection())
    for opt in plain:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        opt.step()
    expected = sum(2 * 4 * max(p.shape) + 4 * min(p.shape) for g in galore.param_groups for p in g["params"])
    assert state_bytes([galore]) == 4 * expected + 4 * len(on_galore)  # fp32 moments and projection, and the step
    assert state_bytes([galore, adamw]) < state_bytes(plain)
