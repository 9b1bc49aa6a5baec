"""Start N processes per node for the user with torch's elastic agent (what torchrun runs), in this process.

One machine: `--nproc-per-node N`. Several: the same command on each with `--nnodes M --rdzv-endpoint HOST:PORT`
(torchrun's c10d rendezvous; `--node-rank 0` hosts its store). `--max-restarts K` restarts every worker of the
group from the newest checkpoint when one dies.

Why in-process rather than a torchrun subprocess: the launcher then sees each worker's failure itself, so an error
is printed once (the root cause, rank 0's when it is the user's) instead of once per rank followed by torchrun's
ChildFailedError traceback; and SIGTERM (a preemption) gives the workers the grace period to checkpoint, after which
the launcher exits 0. Workers report to the launcher through files in MLC_LAUNCH_DIR (mlc.distributed.report).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mlc.distributed import report
from mlc.errors import MlcError, MlcUsageError

GRACE_S = 30  # SLURM's default KillWait and Kubernetes' default terminationGracePeriodSeconds


@dataclass
class LaunchSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # HOST:PORT of node 0 for several machines; empty: this machine alone
    max_restarts: int = 0
    grace_s: float = GRACE_S  # after SIGTERM, how long workers get to checkpoint before SIGKILL
    rdzv_id: str = ""  # the same on every node (default: derived from the endpoint)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise MlcUsageError(
                f"cannot launch {self.nproc_per_node} processes on node {self.node_rank} of {self.nnodes}",
                "use --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes",
            )
        if self.nnodes > 1 and not _host_port(self.rdzv_endpoint):
            raise MlcUsageError(
                f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (got {self.rdzv_endpoint!r})",
                "give node 0's address and a free port, the same on every node, e.g. --rdzv-endpoint 10.0.0.5:29400",
            )
        if self.max_restarts < 0:
            raise MlcUsageError(f"--max-restarts must be >= 0, got {self.max_restarts}", "0 disables restarts")


def under_launcher() -> bool:
    """True when this process is already one of several (torchrun, srun or mlc's own launcher started it)."""
    from mlc.distributed.dist import env_ranks

    return env_ranks()[1] > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def launch_config(spec: LaunchSpec, log_dir: Path):
    """torch's LaunchConfig for the spec: c10d rendezvous, on a free local port when alone."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    spec.check()
    if spec.nnodes == 1 and not spec.rdzv_endpoint:
        endpoint, configs = "localhost:0", {"is_host": True}  # torchrun --standalone: port 0 picks a free one
    else:
        endpoint, configs = spec.rdzv_endpoint, {"is_host": spec.node_rank == 0}
    return LaunchConfig(
        min_nodes=spec.nnodes,
        max_nodes=spec.nnodes,
        nproc_per_node=spec.nproc_per_node,
        run_id=spec.rdzv_id or (f"mlc-{endpoint.replace(':', '-')}" if spec.nnodes > 1 else uuid.uuid4().hex),
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs=configs,
        max_restarts=spec.max_restarts,
        monitor_interval=0.2,
        start_method="spawn",
        shutdown_timeout=int(spec.grace_s),
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.NONE, tee=Std.NONE),
    )


def launch(spec: LaunchSpec, argv: list[str], user_argv: list[str], verbose: bool = False) -> int:
    """Run `python -m <argv>` in every process of this node; returns the exit code for the user (0: done or preempted).

    Prints one line for a failure: the root cause, as the workers reported it.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from mlc import console

    launch_dir = Path(tempfile.mkdtemp(prefix="mlc-launch-"))
    config = launch_config(spec, launch_dir / "logs")
    cores = os.cpu_count() or 1
    os.environ.update(spec.env)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // spec.nproc_per_node)))  # else torchrun's 1
    # A fresh store per rendezvous round: with torch's shared agent store, workers restarted on one node read the
    # gloo addresses that the previous round's workers left in it and wait on them forever (seen with two nodes).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ[report.DIR_ENV] = str(launch_dir)
    os.environ[report.ARGV_ENV] = json.dumps(user_argv)
    os.environ[report.LAUNCH_ENV] = config.run_id
    if not verbose:  # the agent's own chatter (closing signals, restarts, failures) is for --verbose
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint=sys.executable)(*["-m", *argv])
        return 0
    except ChildFailedError as e:
        raise WorkersFailed(*report.root_cause(launch_dir, e.failures)) from None
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        preempted = report.preempted(launch_dir)
        if preempted is None:
            raise WorkersFailed(f"stopped by {name} before the workers wrote a checkpoint", 128 + int(e.sigval)) from None
        console.info(preempted)
        return 0
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)


def _host_port(endpoint: str) -> bool:
    host, sep, port = endpoint.rpartition(":")
    return bool(host and sep and port.isdigit())


class WorkersFailed(MlcError):
    """The worker group failed: the root cause's message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
