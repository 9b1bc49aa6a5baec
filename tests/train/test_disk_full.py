"""A checkpoint that does not fit on the disk (a real 16 MB tmpfs, mounted in a private mount namespace): one line
naming the checkpoint and the bytes it needs, the partial step removed, the run failed, the previous checkpoint intact,
and `mlc runs ls` still working once the disk is completely full."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import write_config

SCRIPT = r"""
set -u
mount -t tmpfs -o size=16m tmpfs "$RUNS" || exit 97
"$PY" -m mlc --runs-dir "$RUNS" train "$CONFIG" --set checkpoint.interval=2 --set checkpoint.keep_last_k=0 \
    > "$OUT/train.out" 2> "$OUT/train.err"
echo $? > "$OUT/train.rc"
dd if=/dev/zero of="$RUNS/filler" bs=64k 2> /dev/null
df -k "$RUNS" | tail -1 | awk '{print $4}' > "$OUT/free_kb"
"$PY" -m mlc --runs-dir "$RUNS" runs ls --json > "$OUT/ls.json" 2> "$OUT/ls.err"
echo $? > "$OUT/ls.rc"
cd "$RUNS" && find . -path ./filler -prune -o -print | sort > "$OUT/files.txt"
cp */run.json "$OUT/run.json"
du -sb */checkpoints/step-00000002 | cut -f1 > "$OUT/step2_bytes"
"""


def private_mount_namespace() -> list[str] | None:
    """`unshare` arguments giving this test a mount namespace of its own (as root, or as a user namespace's root)."""
    if shutil.which("unshare") is None:
        return None
    for args in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        probe = subprocess.run([*args, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return args
    return None


@pytest.mark.slow
def test_a_full_disk_fails_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    unshare = private_mount_namespace()
    if unshare is None:
        pytest.skip("cannot mount a tmpfs here (needs root or unprivileged user namespaces)")
    config = write_config(tmp_path)
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUNS": str(runs), "OUT": str(out), "CONFIG": str(config), "PY": sys.executable}
    proc = subprocess.run([*unshare, "bash", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    # Each checkpoint of the tiny model holds ~13.6 MB (weights, the tied head again, AdamW's two moments): step 2 fits
    # in 16 MB, step 4 does not.
    assert (out / "train.rc").read_text().strip() == "1"
    err = (out / "train.err").read_text()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "Errno 28" not in err, err
    step4 = f"{runs}/" in errors[0] and "/checkpoints/step-00000004" in errors[0]
    assert step4 and "no space left on the device" in errors[0], errors[0]
    # The bytes it names are the tensors; the same state took that on disk at step 2, plus metadata and RNG files.
    needed = float(errors[0].split("needs about ")[1].split(" MB")[0])
    assert needed == pytest.approx(int((out / "step2_bytes").read_text()) / 1e6, rel=0.05)
    assert "step-00000002 is intact" in errors[0]
    files = (out / "files.txt").read_text().split()
    assert not any("step-00000004" in f for f in files)  # the partial step is gone
    assert any(f.endswith("step-00000002/COMPLETE") for f in files)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "no space left" in record["error"]

    assert int((out / "free_kb").read_text()) == 0  # the disk is completely full now
    assert (out / "ls.rc").read_text().strip() == "0", (out / "ls.err").read_text()
    (listed,) = json.loads((out / "ls.json").read_text())
    assert listed["id"] == record["id"] and listed["status"] == "failed"
