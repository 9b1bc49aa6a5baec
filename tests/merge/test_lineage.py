"""A merge records every input (content hash, producing run) and its resolved config, so lineage works
across merges of merges referenced as run:<id>."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mlc.runs.hashing import content_hash

from .tiny import llama_config, llama_tensors, perturb, save_model


def test_a_merge_of_merges_traces_back_to_its_sources(run_mlc, tmp_path: Path):
    cfg = llama_config(layers=1)
    base = llama_tensors(cfg, 0)
    for i, name in enumerate(["base", "x", "y"]):
        save_model(tmp_path / name, cfg, perturb(base, i) if i else base)
    first = tmp_path / "first.yml"
    first.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tmp_path / "x"), "parameters": {"weight": 1}}, {"model": str(tmp_path / "y"), "parameters": {"weight": 1}}]}))
    code, out, err = run_mlc("--json", "merge", first, "--out", tmp_path / "m1")
    assert code == 0, err
    run_id = json.loads(out)["run"]
    second = tmp_path / "second.yml"
    # The first merge is referenced by its run, not by its path.
    second.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(tmp_path / "base"), "models": [{"model": f"run:{run_id}"}], "parameters": {"t": 0.5}}))
    code, out, err = run_mlc("--json", "merge", second, "--out", tmp_path / "m2")
    assert code == 0, err
    record = json.loads((run_mlc.runs_dir / json.loads(out)["run"] / "run.json").read_text())
    inputs = {Path(i["path"]).name: i for i in record["inputs"]}
    assert inputs["m1"]["producer_run"] == run_id and inputs["m1"]["hash"] == content_hash(tmp_path / "m1")
    assert inputs["base"]["role"] == "base" and inputs["base"]["producer_run"] is None
    assert record["config"]["models"][0]["model"] == str(tmp_path / "m1")  # the resolved reference
    assert record["config"]["merge_method"] == "slerp"
    code, out, _ = run_mlc("runs", "lineage", str(tmp_path / "m2"))
    assert code == 0
    assert run_id in out  # the first merge, as the run that made m1
    for name in ("/x", "/y", "/base"):
        assert name in out
