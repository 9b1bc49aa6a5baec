"""The checkpoint manager on one process: complete steps only, keep_last_k, and an exact round trip of the state."""

from __future__ import annotations

import torch

from mlc.engine.checkpoint import MARKER, CheckpointManager, TrainState


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train_steps(model, opt, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_save_keeps_the_last_k_complete_steps_and_ignores_unfinished_ones(tmp_path):
    model, opt = model_and_optimizer(0)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last_k=2)
    state = TrainState(model, [opt])
    for step in (2, 4, 6):
        train_steps(model, opt, 2)
        manager.save(step, state, {"consumed_samples": step * 8})
    assert [s for s, _ in manager.steps()] == [4, 6]
    unfinished = manager.step_dir(8)
    unfinished.mkdir()
    (unfinished / ".metadata").write_bytes(b"partial")
    assert manager.latest() == manager.step_dir(6) and (manager.latest() / MARKER).is_file()


def test_load_restores_weights_optimizer_state_and_rng_exactly(tmp_path):
    model, opt = model_and_optimizer(0)
    train_steps(model, opt, 3)
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(3, TrainState(model, [opt]), {"consumed_samples": 24})
    train_steps(model, opt, 2)  # the uninterrupted future: its batches come from the RNG as it was at the save
    expected = [p.detach().clone() for p in model.parameters()]

    other, other_opt = model_and_optimizer(1)  # other weights, a fresh optimizer, another RNG position
    trainer = manager.load(manager.latest(), TrainState(other, [other_opt]))
    assert trainer["step"] == 3 and trainer["consumed_samples"] == 24 and trainer["rng_restored"]
    train_steps(other, other_opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), expected))
