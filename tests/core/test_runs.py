"""Run directories: life cycle, artifacts and manifests, references, lineage, index, gc, kills and concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlc.errors import InputError, MlcError
from mlc.runs import Run, hashing, index, open_run, read_run
from mlc.runs.lineage import lineage
from mlc.runs.refs import resolve

from .conftest import run_mlc


def make_artifact(root: Path, command: str, inputs: list[str], content: str, out: Path | None = None) -> Run:
    with open_run(command, config={"content": content}, runs_root=root) as run:
        for ref in inputs:
            run.add_input(ref)
        with run.artifact("model", out=out) as staging:
            (staging / "weights.txt").write_text(content)
    return run


def test_completed_run_records_everything(runs_root: Path, tmp_path: Path):
    data_file = tmp_path / "data.txt"
    data_file.write_text("hello")
    with open_run("train", config={"lr": 0.1}, runs_root=runs_root, argv=["mlc", "train", "x.toml"]) as run:
        run.add_input(str(data_file), role="data")
        run.log_metrics({"step": 1, "loss": 2.5})
        run.log("step 1 done")
        with run.artifact("model") as staging:
            (staging / "a.bin").write_bytes(b"\x00" * 10)
    record = read_run(run.path)
    d = record.data
    assert d["status"] == "completed" and d["exit_code"] == 0
    assert d["argv"] == ["mlc", "train", "x.toml"] and d["config"] == {"lr": 0.1}
    assert d["pid"] == os.getpid() and d["host"] and d["versions"]["mlc"] and d["versions"]["python"]
    assert "git_commit" in d
    import hashlib

    assert d["inputs"][0]["hash"] == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    manifest = json.loads((run.path / "artifacts/model/manifest.json").read_text())
    assert manifest["files"]["a.bin"]["sha256"] == hashlib.sha256(b"\x00" * 10).hexdigest()
    assert json.loads((run.path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.5
    assert "step 1 done" in (run.path / "log.txt").read_text()


def test_failed_run_is_marked_failed_and_leaves_no_artifact(runs_root: Path):
    with pytest.raises(ValueError):
        with open_run("merge", runs_root=runs_root) as run:
            with run.artifact("model") as staging:
                (staging / "half.bin").write_bytes(b"1")
                raise ValueError("boom")
    record = read_run(run.path)
    assert record.status == "failed" and "boom" in record.data["error"]
    assert not (run.path / "artifacts/model").exists()
    assert not list((run.path / "artifacts").iterdir())


def test_external_output_is_written_atomically_and_keeps_old_output_on_failure(runs_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    make_artifact(runs_root, "merge", [], "v1", out=out)
    assert (out / "weights.txt").read_text() == "v1"
    with pytest.raises(InputError, match="already exists"):
        make_artifact(runs_root, "merge", [], "v2", out=out)
    with pytest.raises(RuntimeError):
        with open_run("merge", runs_root=runs_root) as run:
            with run.artifact("model", out=out, overwrite=True) as staging:
                (staging / "weights.txt").write_text("partial")
                raise RuntimeError("died mid-write")
    assert (out / "weights.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_kill_9_of_a_running_command_shows_as_interrupted(plugin_site: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(plugin_site), "MLC_RUNS_DIR": str(tmp_path / "runs")}
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-m", "mlc", "nap", "--marker", str(marker)], env=env)
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    listed = json.loads(run_mlc("runs", "ls", "--json", env=env).stdout)
    assert [r["status"] for r in listed] == ["running"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    listed = json.loads(run_mlc("runs", "ls", "--json", env=env).stdout)
    assert [r["status"] for r in listed] == ["interrupted"]
    assert json.loads(run_mlc("runs", "ls", "--status", "running", "--json", env=env).stdout) == []


def test_concurrent_runs_get_distinct_directories_and_all_complete(plugin_site: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(plugin_site), "MLC_RUNS_DIR": str(tmp_path / "runs")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "mlc", "nap", "--seconds", "0.2", "--marker", str(tmp_path / f"m{i}")], env=env)
        for i in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    listed = json.loads(run_mlc("runs", "ls", "--json", env=env).stdout)
    assert len({r["id"] for r in listed}) == 4
    assert {r["status"] for r in listed} == {"completed"}


def test_a_run_being_written_cannot_be_taken_over(runs_root: Path):
    with open_run("train", runs_root=runs_root) as run:
        with pytest.raises(MlcError, match="being written by another process"):
            Run.reopen(run.path)
    resumed = Run.reopen(run.path)
    resumed.finish("completed", 0)
    assert read_run(run.path).data["resumes"]


def test_references_resolve_paths_run_ids_artifacts_and_latest(runs_root: Path, tmp_path: Path):
    first = make_artifact(runs_root, "train", [], "a")
    time.sleep(1.1)  # run ids and ordering have one-second resolution
    second = make_artifact(runs_root, "train", [], "b")
    assert resolve(f"run:{first.id}", runs_root).path == first.path / "artifacts/model"
    short = first.id.rsplit("-", 1)[1]
    assert resolve(f"run:{short}/model", runs_root).run_id == first.id
    assert resolve("latest:train", runs_root).run_id == second.id
    assert resolve(str(tmp_path), runs_root).path == tmp_path
    with pytest.raises(InputError, match="has no artifact 'nope'"):
        resolve(f"run:{short}/nope", runs_root)
    with pytest.raises(InputError, match="no completed merge run"):
        resolve("latest:merge", runs_root)
    with pytest.raises(InputError, match="does not exist"):
        resolve(str(tmp_path / "missing"), runs_root)
    with pytest.raises(InputError, match="is not a path, but it is a run id") as bare:
        resolve(first.id, runs_root)  # a bare id (from `mlc runs ls`) gets told the run: form
    assert bare.value.hint == f"refer to the run as run:{first.id}"


def test_lineage_follows_artifacts_back_through_runs(runs_root: Path, tmp_path: Path):
    data = tmp_path / "corpus.txt"
    data.write_text("text")
    trained = make_artifact(runs_root, "train", [str(data)], "weights")
    merged = make_artifact(runs_root, "merge", [f"run:{trained.id}", str(data)], "merged", out=tmp_path / "merged")
    quantized = make_artifact(runs_root, "quantize", [str(tmp_path / "merged")], "q")
    tree = lineage(runs_root, f"run:{quantized.id}/model")
    assert tree["command"] == "quantize"
    merge_node = tree["inputs"][0]
    assert merge_node["run"] == merged.id  # found by content hash: the input was given as a plain path
    assert [c.get("run") or c.get("path") for c in merge_node["inputs"]] == [trained.id, str(data)]
    assert merge_node["inputs"][0]["inputs"][0]["path"] == str(data)
    proc = run_mlc("--runs-dir", str(runs_root), "runs", "lineage", str(tmp_path / "merged"))
    assert proc.returncode == 0 and "merge run" in proc.stdout and "train run" in proc.stdout


def test_lineage_printed_to_a_pipe_keeps_every_path_whole(runs_root: Path, tmp_path: Path):
    data = tmp_path / ("a-directory-name-long-enough-to-pass-eighty-columns-" * 3) / "corpus.txt"
    data.parent.mkdir()
    data.write_text("text")
    trained = make_artifact(runs_root, "train", [str(data)], "weights")
    proc = run_mlc("--runs-dir", str(runs_root), "runs", "lineage", f"run:{trained.id}")  # stdout is a pipe
    assert proc.returncode == 0 and str(data) in proc.stdout


def test_index_can_be_rebuilt_from_the_run_directories(runs_root: Path):
    runs = [make_artifact(runs_root, "train", [], str(i)) for i in range(3)]
    before = {r["id"] for r in index.query_runs(runs_root)}
    (runs_root / index.INDEX_FILE).unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(runs_root / index.INDEX_FILE) + suffix).unlink(missing_ok=True)
    assert index.reindex(runs_root) == 3
    assert {r["id"] for r in index.query_runs(runs_root)} == before == {r.id for r in runs}


def test_gc_removes_failed_runs_but_not_completed_or_needed_ones(runs_root: Path):
    keep = make_artifact(runs_root, "train", [], "ok")
    with pytest.raises(ValueError):
        with open_run("train", runs_root=runs_root) as failed:
            raise ValueError("x")
    proc = run_mlc("--runs-dir", str(runs_root), "runs", "gc", "--dry-run", "--json")
    assert json.loads(proc.stdout)["removed"] == [str(failed.path)]
    assert failed.path.exists()
    run_mlc("--runs-dir", str(runs_root), "runs", "gc")
    assert not failed.path.exists() and keep.path.exists()


def test_hashes_are_cached_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_local", type(hashing._local)())
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * hashing.CHUNK + 5))
    real = hashing.file_sha256(big)
    conn = hashing._cache()
    with conn:
        conn.execute("UPDATE hashes SET sha256 = 'cached-value'")
    assert hashing.file_sha256(big) == "cached-value"  # unchanged file: no re-read
    st = big.stat()
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert hashing.file_sha256(big) == real  # touched: hashed again
