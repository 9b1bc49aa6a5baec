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


def test_async_and_sync_saves_of_the_same_state_hold_the_same_bytes(tmp_path):
    """The reused staging buffers hold a copy: every saved tensor (weights, AdamW moments, step) and every other value
    read back from the async checkpoint equals the sync one's, at the first save and at a later one (buffers reused)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model, opt = model_and_optimizer(0)
    state = TrainState(model, [opt])
    sync = CheckpointManager(tmp_path / "sync")
    asyn = CheckpointManager(tmp_path / "async", async_save=True)
    for step in (1, 2):
        train_steps(model, opt, 1)
        sync.save(step, state, {"consumed_samples": step})
        asyn.save(step, state, {"consumed_samples": step})
        train_steps(model, opt, 1)  # moves on while the async write may still run
        asyn.wait()
    asyn.close()
    for step in (1, 2):
        a, b = tmp_path / f"a{step}.pt", tmp_path / f"s{step}.pt"
        dcp_to_torch_save(asyn.step_dir(step), a)
        dcp_to_torch_save(sync.step_dir(step), b)
        got, want = _flat(torch.load(a, weights_only=False)), _flat(torch.load(b, weights_only=False))
        assert got.keys() == want.keys() and len(got) > 10
        for key, value in want.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
        assert not torch.equal(got["train.model.0.weight"], model[0].weight.detach())  # the step's state, not the later one
    assert torch.equal(torch.load(asyn.step_dir(2) / "rng-rank0.pt", weights_only=False)["torch"],
                       torch.load(sync.step_dir(2) / "rng-rank0.pt", weights_only=False)["torch"])


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def test_the_first_optimizer_step_after_an_async_save_waits_for_the_staging_copy(tmp_path, monkeypatch):
    """The copy to host memory runs while the next forward/backward read the tensors; a slow copy (held back 0.3 s
    here) must still hold the state of the save's step, not the one the next optimizer step makes."""
    import time

    from mlc.distributed.async_save import HostStaging

    slow_copy = HostStaging._copy

    def held_back(self, *args):
        time.sleep(0.3)
        return slow_copy(self, *args)

    monkeypatch.setattr(HostStaging, "_copy", held_back)
    model, opt = model_and_optimizer(0)
    train_steps(model, opt, 1)
    manager = CheckpointManager(tmp_path / "ckpt", async_save=True)
    manager.save(1, TrainState(model, [opt]), {"consumed_samples": 1})
    saved = [p.detach().clone() for p in model.parameters()]
    t0 = time.perf_counter()
    train_steps(model, opt, 1)  # its optimizer step blocks until the copy is done
    assert time.perf_counter() - t0 >= 0.2 and manager.writer.wait_s >= 0.2
    manager.close()
    other, other_opt = model_and_optimizer(1)
    manager.load(manager.latest(), TrainState(other, [other_opt]))
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), saved))
