"""In-memory snapshots (REFT): keepers that outlive the trainer, resume from memory, one lost keeper rebuilt from parity.

The end-to-end test runs `mlc train` on 2 gloo processes (DDP) with a disk checkpoint every 4 steps and a snapshot
every other step; its reference is the same run uninterrupted.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mlc.distributed import snapshot

from .conftest import metrics, mlc_train, segments, train_runs, write_config

SETS = ("checkpoint.interval=4", "checkpoint.snapshot_interval=1", "checkpoint.snapshot_keep_s=60")


def keepers(run: Path) -> dict[int, int]:
    """rank -> pid of the live keeper processes of a run (found by their name on the command line)."""
    names = {snapshot.keeper_name(run, r): r for r in range(2)}
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        for arg in argv:
            if arg.decode(errors="replace") in names and "Z" not in state:
                found[names[arg.decode()]] = int(proc.name)
    return found


def wait_gone(run: Path, timeout: float = 10.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while (left := keepers(run)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def weights(run: Path) -> dict:
    summary = json.loads((run / "run.json").read_text())["summary"]
    return load_file(str(Path(summary["artifact"]) / "model.safetensors"))


def test_a_keeper_holds_the_two_newest_steps_and_exits_after_its_timeout_without_a_trainer(tmp_path):
    name = snapshot.keeper_name(tmp_path, 0)
    client = snapshot.KeeperClient(name, "secret", keep_s=1.0)
    for step in (1, 2, 3):
        client.call({"op": "put", "kind": "shard", "step": step, "meta": {"n": step}}, bytes([step]) * 1000)
    listing = client.call({"op": "list"})[0]["list"]
    assert listing == {"shard": {"2": {"n": 2}, "3": {"n": 3}}}
    assert client.call({"op": "get", "kind": "shard", "step": 3})[1] == bytes([3]) * 1000
    with pytest.raises(ConnectionError):  # a client without the run's key is refused
        snapshot.KeeperClient(name, "wrong", keep_s=1.0, start=False)
    pid = client.pid
    client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.slow
def test_killed_trainer_resumes_from_memory_and_from_parity_bitwise(tmp_path):
    """Uninterrupted reference; then kill -9 of every rank and of the launcher after snapshot 5 (disk: step 4) -> resumed
    from the snapshot of step 5 in the keepers; killed again after snapshot 7, rank 1's keeper killed too -> resumed from
    step 7 with rank 1's shard rebuilt from rank 0's parity. Loss curve and final weights bitwise the reference's."""
    config = write_config(tmp_path)
    ref_runs, runs = tmp_path / "ref", tmp_path / "runs"
    mlc_train(config, ref_runs, *SETS, nproc=2)
    (ref,) = train_runs(ref_runs)
    assert not wait_gone(ref)  # the run completed: its keepers exited
    ref_curve = segments(ref)[0]
    assert sorted(ref_curve) == list(range(1, 9))

    # Snapshots are stored in the background: each process is killed once its keeper holds that step.
    kill_all = {"MLC_FAULT_SIGNAL": "after-snapshot:5:KILL:launcher", "MLC_FAULT_KILL": "after-snapshot:5"}
    first = mlc_train(config, runs, *SETS, nproc=2, env=kill_all, check=False)
    assert first.returncode == -9  # the launcher itself was killed
    (run,) = train_runs(runs)
    assert [s for s, _ in _disk_steps(run)] == [4]
    assert sorted(keepers(run)) == [0, 1]  # both keepers outlived the trainer

    kill_all = {"MLC_FAULT_SIGNAL": "after-snapshot:7:KILL:launcher", "MLC_FAULT_KILL": "after-snapshot:7"}
    second = mlc_train(config, runs, *SETS, nproc=2, env=kill_all, check=False)
    assert second.returncode == -9
    assert [s for s, _ in _disk_steps(run)] == [4]  # no disk checkpoint newer than the snapshots
    os.kill(keepers(run)[1], signal.SIGKILL)  # rank 1's snapshot is lost with its keeper
    assert wait_gone(run, 5).keys() == {0}

    mlc_train(config, runs, *SETS, nproc=2)
    resumes = [m for m in metrics(run) if m.get("event") == "resume"]
    assert [(m["step"], m["snapshot"], m["rebuilt_rank"]) for m in resumes] == [(5, 5, None), (7, 7, 1)]
    seg1, seg2, seg3 = segments(run)
    # The loop may have run a step past the snapshot before its thread killed the process: that step is redone.
    assert min(seg1) == 1 and max(seg1) in (5, 6) and min(seg2) == 6 and max(seg2) in (7, 8) and sorted(seg3) == [8]
    assert all(seg[s] == ref_curve[s] for seg in (seg1, seg2, seg3) for s in seg)  # bitwise
    got, want = weights(run), weights(ref)
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    assert not wait_gone(run)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and len(record["resumes"]) == 2


def _disk_steps(run: Path) -> list[tuple[int, Path]]:
    from mlc.distributed.checkpoint import CheckpointManager

    return CheckpointManager(run / "checkpoints").steps()
