"""`mlc train --slurm`: the sbatch script, a submission to a scripted `sbatch` that checks its arguments and runs
the job the way SLURM would (one task per node through a scripted `srun`, SLURM's variables set), and SLURM times.

SLURM cannot run here: the scripted sbatch/srun stand in for it on PATH. What they run is real: submitit's job
entry point unpickles mlc's job, which starts `mlc train` with mlc's launcher on each "node" (two on this machine,
meeting at a c10d rendezvous on the first node's host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import SMALL, train_runs, write_config

pytest.importorskip("submitit")

SBATCH = r'''#!PYTHON
"""sbatch as the test's SLURM: checks the call, records the script, runs it as a job of NODES nodes, answers like
sbatch. Exit 1 (with a message on stderr) on anything unexpected."""
import os, re, subprocess, sys
args = sys.argv[1:]
if len(args) != 1 or not os.path.isfile(args[0]):
    sys.exit(f"fake sbatch: expected one script file, got {args}")
script = open(args[0]).read()
flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))
open(os.environ["FAKE_SLURM_DIR"] + "/script.sh", "w").write(script)
nodes = int(flags["nodes"])
env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
       "SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes)}
if os.environ.get("FAKE_SLURM_RUN") == "1":  # later, as SLURM would: submitit files the job after sbatch answers
    rc = os.environ["FAKE_SLURM_DIR"] + "/job.rc"
    subprocess.Popen(["bash", "-c", f'bash "$0"; echo $? > {rc}.tmp && mv {rc}.tmp {rc}', args[0]], env=env,
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("Submitted batch job 4242")
'''

SRUN = r'''#!PYTHON
"""srun as the test's SLURM: one task per node (SLURM_NODEID = SLURM_PROCID = node), output to --output's file."""
import os, subprocess, sys
args = sys.argv[1:]
out = None
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        value = args.pop(0)
        out = value if flag == "--output" else out
    elif flag != "--unbuffered":
        sys.exit(f"fake srun: unexpected option {flag}")
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
tasks = []
for node in range(nodes):
    env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0",
           "SLURM_NTASKS": str(nodes), "SLURM_STEP_ID": "0"}
    path = out.replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", str(node))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tasks.append(subprocess.Popen(args, env=env, stdout=open(path, "a"), stderr=subprocess.STDOUT))
sys.exit(max(t.wait() for t in tasks))
'''


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN)):
        path = bin_dir / name
        path.write_text(text.replace("PYTHON", sys.executable, 1))
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path)}


def mlc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mlc", *args], capture_output=True, text=True, env=environment, timeout=300)


def test_dry_run_prints_the_sbatch_script_for_nodes_gpus_and_time(tmp_path, run_mlc):
    config, runs = write_config(tmp_path), run_mlc.runs_dir
    code, out, err = run_mlc("train", config, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--time", "04:00:00",
                             "--partition", "gpu", "--sbatch", "constraint=h100", "--set", "train.batch_size=64", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    for flag in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--time=240", "--partition=gpu",
                 "--constraint=h100", "--signal=USR2@120"):
        assert f"#SBATCH {flag}" in lines, out
    assert f"#SBATCH --output={runs.absolute()}/slurm/%j/%j_0_log.out" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.endswith(f"-m submitit.core._submit {runs.absolute()}/slurm/%j")
    assert not runs.exists() or not train_runs(runs)  # nothing trained, nothing submitted


def test_a_batch_that_does_not_split_over_the_job_fails_before_submitting(tmp_path, run_mlc, monkeypatch):
    config = write_config(tmp_path)
    for key, value in fake_slurm(tmp_path).items():
        monkeypatch.setenv(key, value)
    code, _, err = run_mlc("train", config, "--slurm", "--nodes", "2", "--gpus-per-node", "8")
    assert code != 0 and "16 processes" in err
    assert not (tmp_path / "script.sh").exists()
    code, _, err = run_mlc("train", config, "--slurm", "--time", "4 hours")
    assert code != 0 and err.startswith("error: --time '4 hours' is not a SLURM time"), err


@pytest.mark.slow
def test_submitted_job_trains_on_two_nodes_through_sbatch_and_srun(tmp_path):
    """sbatch gets submitit's script; the job's two tasks (one per node) start mlc's launcher with one process each,
    which meet at the first node's rendezvous and train the run to the end: a 2-process run."""
    config, runs = write_config(tmp_path, SMALL.replace("interval = 2", "interval = 0").replace("steps = 8", "steps = 2").replace("warmup_steps = 2", "warmup_steps = 0")), tmp_path / "runs"
    env = {**fake_slurm(tmp_path), "FAKE_SLURM_RUN": "1"}
    proc = mlc("--runs-dir", str(runs), "train", str(config), "--slurm", "--nodes", "2", "--time", "10", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    submitted = json.loads(proc.stdout)
    assert submitted["job_id"] == "4242" and submitted["log"] == f"{runs.absolute()}/slurm/4242/4242_0_log.out"
    done = tmp_path / "job.rc"
    for _ in range(600):
        if done.exists():
            break
        time.sleep(0.5)
    assert done.read_text().strip() == "0", Path(submitted["log"]).read_text()[-3000:]
    script = (tmp_path / "script.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --time=10" in script and "gpus" not in script
    (run,) = train_runs(runs)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["summary"]["world_size"] == 2
    assert record["summary"]["steps"] == 2


def test_slurm_times_and_the_rendezvous_port():
    from mlc.commands.train.slurm import parse_time
    from mlc.distributed.dist import job_port as rdzv_port
    from mlc.errors import MlcUsageError

    assert [parse_time(t) for t in ("90", "30:00", "04:00:00", "1-00:00:00", "2-12", "00:00:30")] == [90, 30, 240, 1440, 3600, 1]
    for bad in ("", "4h", "1:2:3:4", "-5", "0"):
        with pytest.raises(MlcUsageError):
            parse_time(bad)
    assert rdzv_port("4242") == 24242 and rdzv_port("123456_7") != rdzv_port("123457_7")
    assert all(20000 <= rdzv_port(j) < 40000 for j in ("1", "99999999")) and rdzv_port("") == 29500


def test_slurm_options_without_slurm_are_refused_not_ignored(tmp_path, run_mlc):
    code, _, err = run_mlc("train", write_config(tmp_path), "--nodes", "2", "--dry-run")
    assert code != 0 and err.startswith("error: --nodes, --dry-run only apply to a SLURM submission"), err
    assert not run_mlc.runs_dir.exists() or not train_runs(run_mlc.runs_dir)
