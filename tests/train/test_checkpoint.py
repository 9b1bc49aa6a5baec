"""The checkpoint manager on one process: complete steps only, keep_last_k, and an exact round trip of the state."""

from __future__ import annotations

import torch

from mlc.distributed.checkpoint import MARKER, CheckpointManager, TrainState


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


def test_launch_config_for_one_and_several_machines(tmp_path):
    import pytest

    from mlc.distributed.launch import LaunchSpec, launch_config
    from mlc.errors import MlcUsageError

    one = launch_config(LaunchSpec(nproc_per_node=2), tmp_path)
    assert (one.min_nodes, one.max_nodes, one.nproc_per_node, one.rdzv_backend) == (1, 1, 2, "c10d")
    assert one.rdzv_endpoint == "localhost:0" and one.max_restarts == 0  # a free port, as torchrun --standalone
    many = launch_config(LaunchSpec(4, 2, 1, "10.0.0.5:29400", max_restarts=3, grace_s=60), tmp_path)
    assert (many.min_nodes, many.max_nodes, many.rdzv_endpoint, many.max_restarts) == (2, 2, "10.0.0.5:29400", 3)
    assert many.rdzv_configs["is_host"] is False and many.shutdown_timeout == 60
    # Every node derives the same rendezvous id from the endpoint; node 0 hosts the store.
    assert launch_config(LaunchSpec(4, 2, 0, "10.0.0.5:29400"), tmp_path).run_id == many.run_id
    with pytest.raises(MlcUsageError, match="--rdzv-endpoint"):
        launch_config(LaunchSpec(2, 2, 0), tmp_path)


def test_ranks_come_from_torchrun_then_srun_then_a_lone_process():
    from mlc.distributed.dist import env_ranks

    assert env_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert env_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    assert env_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)
    assert env_ranks({}) == (0, 1, 0)
