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


def test_torchrun_command_for_one_and_several_machines():
    from mlc.engine.launch import LaunchSpec, torchrun_argv

    one = torchrun_argv(LaunchSpec(nproc_per_node=2), ["mlc", "train", "x.toml"])
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--standalone", "-m", "mlc", "train", "x.toml"]
    many = torchrun_argv(LaunchSpec(4, 2, 1, "10.0.0.5", 29400), ["mlc", "train", "x.toml"])
    assert "--node-rank=1" in many and "--master-addr=10.0.0.5" in many and "--master-port=29400" in many


def test_ranks_come_from_torchrun_then_srun_then_a_lone_process():
    from mlc.engine.dist import env_ranks

    assert env_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert env_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    assert env_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)
    assert env_ranks({}) == (0, 1, 0)
