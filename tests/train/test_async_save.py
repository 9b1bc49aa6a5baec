"""Asynchronous checkpoints on one process: `save` returns after the copy to host memory, the write holds the state
as it was at the save (not as training left it afterwards), and the step counts only once the write finished."""

from __future__ import annotations

import torch

from mlc.distributed.checkpoint import MARKER, CheckpointManager, TrainState

from .test_checkpoint import model_and_optimizer, train_steps


def test_async_save_writes_the_state_of_its_step_while_training_goes_on(tmp_path):
    model, opt = model_and_optimizer(0)
    train_steps(model, opt, 3)
    manager = CheckpointManager(tmp_path / "ckpt", async_save=True)
    manager.save(3, TrainState(model, [opt]), {"consumed_samples": 24})
    saved = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, 2)  # mutates the parameters and AdamW's moments in place while the write may run
    assert manager.wait() == manager.step_dir(3) and (manager.step_dir(3) / MARKER).is_file()
    expected = [p.detach().clone() for p in model.parameters()]

    other, other_opt = model_and_optimizer(1)
    trainer = manager.load(manager.latest(), TrainState(other, [other_opt]))
    assert trainer["step"] == 3 and trainer["rng_restored"]
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), saved))
    train_steps(other, other_opt, 2)  # the optimizer state and RNG were those of step 3 too: the same future, bitwise
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), expected))
    manager.close()


def test_a_second_async_save_waits_for_the_first_and_prunes_after_completion(tmp_path):
    model, opt = model_and_optimizer(0)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last_k=1, async_save=True)
    state = TrainState(model, [opt])
    for step in (1, 2, 3):
        train_steps(model, opt, 1)
        manager.save(step, state, {"consumed_samples": step})
    manager.close()
    assert [s for s, _ in manager.steps(complete_only=False)] == [3]
