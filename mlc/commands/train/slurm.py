"""`mlc train CONFIG --slurm`: submit the training run as a SLURM job through submitit.

The job has one task per node. Each task runs the same `mlc train` command line with mlc's own launcher
(mlc.distributed.launch): `--nproc-per-node` processes on its node, `--nnodes`/`--node-rank` from submitit's view of
the job (SLURM_NODEID, the job's node list) and a c10d rendezvous on the job's first node. So a multi-node SLURM job
is exactly the multi-node run that the launcher's tests run on one machine, with its single error line and its
preemption handling.

Time limit and preemption: submitit asks SLURM for USR2 `grace` seconds before the limit (`#SBATCH --signal`).
`TrainJob.checkpoint` (submitit calls it on that signal) sends SIGTERM to the node's `mlc train`, which writes a
checkpoint and exits 0, then submitit requeues the job; the requeued job's `mlc train` resumes the same run
(checkpoint.resume = "auto" finds it by its config fingerprint). The runs directory must therefore be on storage
that every node and the requeued job see (a shared filesystem): submitit's job folder lives inside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlc.distributed.dist import job_port
from mlc.errors import MlcUsageError

# What srun sets for each task. The node's `mlc train` must not read them: it is one launcher per node, not one of
# nodes x processes workers (mlc.distributed.dist.env_ranks would take SLURM_PROCID/SLURM_NTASKS as its rank).
TASK_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_NPROCS")
GRACE_S = 120  # USR2 this long before the time limit: the checkpoint's grace period plus the time to requeue


@dataclass
class SlurmSpec:
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job
    nproc_per_node: int = 0  # processes per node; default: gpus_per_node, or 1 on CPUs
    time: str = "01:00:00"  # [D-]HH:MM:SS, or minutes
    partition: str = ""
    account: str = ""
    extra: list[str] = field(default_factory=list)  # more #SBATCH flags, as `key=value`

    @property
    def processes(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    def minutes(self) -> int:
        return parse_time(self.time)

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.nproc_per_node < 0:
            raise MlcUsageError(
                f"--slurm needs --nodes >= 1 and --gpus-per-node >= 0 (got {self.nodes} and {self.gpus_per_node})",
                "e.g. --slurm --nodes 2 --gpus-per-node 8 --time 04:00:00",
            )
        self.minutes()
        for item in self.extra:
            if "=" not in item or not item.split("=", 1)[0].strip():
                raise MlcUsageError(f"--sbatch {item!r} is not key=value", "e.g. --sbatch constraint=h100 --sbatch qos=high")


def parse_time(text: str) -> int:
    """SLURM's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes, rounded up."""
    import re

    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        raise MlcUsageError(f"--time {text!r} is not a SLURM time", "use HH:MM:SS, D-HH:MM:SS or minutes, e.g. --time 04:00:00")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        h, mins, s = a, b or 0, c or 0
        total = days * 1440
    else:
        total = 0
        if b is None:  # minutes
            h, mins, s = 0, a, 0
        elif c is None:  # MM:SS
            h, mins, s = 0, a, b
        else:
            h, mins, s = a, b, c
    total += h * 60 + mins + (1 if s else 0)
    if total < 1:
        raise MlcUsageError(f"--time {text!r} is shorter than a minute", "e.g. --time 04:00:00")
    return total


def executor_parameters(spec: SlurmSpec, name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (the #SBATCH lines) for the spec: one task per node."""
    params: dict[str, Any] = {
        "job_name": name, "nodes": spec.nodes, "ntasks_per_node": 1, "time": spec.minutes(),
        "signal_delay_s": GRACE_S, "stderr_to_stdout": True,
    }
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    if spec.partition:
        params["partition"] = spec.partition
    if spec.account:
        params["account"] = spec.account
    if spec.extra:
        params["additional_parameters"] = dict(item.split("=", 1) for item in spec.extra)
    return params


@dataclass
class TrainJob:
    """What each node's task runs (pickled by submitit): `mlc train` with mlc's launcher for this node."""

    argv: list[str]  # `-m mlc ... train CONFIG --set ...`, without the launcher's options
    nproc_per_node: int
    grace_s: float = GRACE_S - 30

    def node_argv(self, nodes: int, node: int, first_host: str, job_id: str) -> list[str]:
        args = [sys.executable, *self.argv, "--nproc-per-node", str(self.nproc_per_node)]
        if nodes > 1:
            endpoint = f"{first_host}:{job_port(job_id)}"  # derived from the job id: jobs sharing a node differ
            args += ["--nnodes", str(nodes), "--node-rank", str(node), "--rdzv-endpoint", endpoint]
        return args

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        argv = self.node_argv(env.num_nodes, env.node, env.hostnames[0], str(env.job_id))
        child_env = {k: v for k, v in os.environ.items() if k not in TASK_VARS}
        self._child = subprocess.Popen(argv, env=child_env)  # its output goes to the job's log (submitit's stdout file)
        code = self._child.wait()
        if code != 0:
            raise SystemExit(f"mlc train exited with {code} on node {env.node} (the log above has its error)")
        return code

    def checkpoint(self) -> Any:
        """submitit calls this on the time-limit/preemption signal: checkpoint, then requeue the same job."""
        import submitit

        child = getattr(self, "_child", None)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # mlc train checkpoints and exits 0
            try:
                child.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
        fresh = TrainJob(self.argv, self.nproc_per_node, self.grace_s)
        return submitit.helpers.DelayedSubmission(fresh)


def job_argv(config: Path, overrides: list[str], runs_dir: Path, debug: bool) -> list[str]:
    args = ["-m", "mlc"] + (["--debug"] if debug else []) + ["--runs-dir", str(runs_dir.absolute()), "train", str(config.absolute())]
    return args + [a for o in overrides for a in ("--set", o)]


def job_folder(runs_dir: Path) -> Path:
    """Where submitit keeps each job's pickled call, logs and result: inside the (shared) runs directory."""
    return runs_dir.absolute() / "slurm" / "%j"


def sbatch_script(spec: SlurmSpec, job: TrainJob, runs_dir: Path, name: str) -> str:
    """The script submitit submits for this job (what --dry-run prints): its #SBATCH lines and srun command."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit's own script writer (no public equivalent)

    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(job_folder(runs_dir))])
    return _make_sbatch_string(command=command, folder=job_folder(runs_dir), **executor_parameters(spec, name))


def submit(spec: SlurmSpec, job: TrainJob, runs_dir: Path, name: str) -> Any:
    """Submit through sbatch (submitit's SlurmExecutor); returns submitit's Job."""
    import submitit

    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
        raise MlcUsageError("--slurm submits a new job, but this is already inside a SLURM job step", "run `mlc train` without --slurm under srun")
    try:
        executor = submitit.SlurmExecutor(folder=job_folder(runs_dir), max_num_timeout=100)
    except RuntimeError as e:  # no srun on PATH
        raise MlcUsageError(f"--slurm: {e}", "run it on a SLURM login node, or add --dry-run to print the sbatch script") from None
    executor.update_parameters(**executor_parameters(spec, name))
    return executor.submit(job)
