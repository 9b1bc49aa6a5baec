"""Start N processes per node under torchrun for the user, re-running the same mlc command in each."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from mlc.errors import MlcUsageError


@dataclass
class LaunchSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def under_launcher() -> bool:
    """True when this process is already one of several (torchrun or srun started it)."""
    from mlc.engine.dist import env_ranks

    return env_ranks()[1] > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_argv(spec: LaunchSpec, module_args: list[str]) -> list[str]:
    """The torchrun command line that runs `python -m <module_args>` in every process."""
    if spec.nproc_per_node < 1 or spec.nnodes < 1 or not 0 <= spec.node_rank < spec.nnodes:
        raise MlcUsageError(
            f"cannot launch {spec.nproc_per_node} processes on node {spec.node_rank} of {spec.nnodes}",
            "use --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes",
        )
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node}", f"--nnodes={spec.nnodes}"]
    if spec.nnodes == 1:
        # --standalone picks a free port itself, so two launches on one machine never collide.
        argv.append("--standalone")
    else:
        argv += [f"--node-rank={spec.node_rank}", f"--master-addr={spec.master_addr}", f"--master-port={spec.master_port}"]
    return argv + ["-m", *module_args]


def run_torchrun(spec: LaunchSpec, module_args: list[str], env: dict[str, str] | None = None) -> int:
    """Run torchrun in the foreground and return its exit code (Ctrl-C reaches every process)."""
    environment = dict(os.environ if env is None else env)
    # torchrun would otherwise pin every worker to one thread; share the cores instead.
    cores = os.cpu_count() or 1
    environment.setdefault("OMP_NUM_THREADS", str(max(1, cores // spec.nproc_per_node)))
    return subprocess.call(torchrun_argv(spec, module_args), env=environment)
