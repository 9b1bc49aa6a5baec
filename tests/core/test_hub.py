"""Models by Hugging Face Hub id resolve through huggingface_hub's cache, offline here: the cache is built by the
test in the Hub's own layout (refs/<revision> -> snapshots/<commit>/...), and the run records revision and commit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from tests.merge.tiny import llama_config, llama_tensors, load, save_model

from .conftest import run_mlc

COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def hub_cache(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A cache holding acme/tiny at two revisions (main and v1), each a different tiny model."""
    repo = root / "models--acme--tiny"
    weights = {}
    cfg = llama_config(layers=1)
    for i, (revision, commit) in enumerate(COMMITS.items()):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        weights[revision] = llama_tensors(cfg, seed=i)
        save_model(repo / "snapshots" / commit, cfg, weights[revision])
    return weights


def test_a_merge_of_hub_ids_reads_the_cached_revisions_and_records_their_commits(tmp_path: Path):
    weights = hub_cache(tmp_path / "hub")
    (tmp_path / "m.yml").write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": "acme/tiny", "parameters": {"weight": 1}}, {"model": "acme/tiny@v1", "parameters": {"weight": 3}}],
    }))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "MLC_RUNS_DIR": str(tmp_path / "runs")}
    proc = run_mlc("--json", "merge", str(tmp_path / "m.yml"), "--out", str(tmp_path / "out"), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = load(tmp_path / "out")
    for name, w in weights["main"].items():
        assert torch.allclose(got[name], (w + 3 * weights["v1"][name]) / 4, atol=1e-6), name
    run = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    hubs = sorted((i["hub"]["revision"], i["hub"]["commit"], i["hub"]["repo"]) for i in run["inputs"])
    assert hubs == [("main", COMMITS["main"], "acme/tiny"), ("v1", COMMITS["v1"], "acme/tiny")]


def test_an_uncached_hub_id_offline_is_a_one_line_error_naming_the_offline_mode(tmp_path: Path):
    hub_cache(tmp_path / "hub")  # acme/tiny is cached; acme/other is not
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "MLC_RUNS_DIR": str(tmp_path / "runs")}
    (tmp_path / "data.txt").write_text("some text to score")
    proc = run_mlc("eval", "acme/other", "--data", str(tmp_path / "data.txt"), env=env, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "acme/other is neither a local path nor in the Hugging Face cache (HF_HUB_OFFLINE is set)" in proc.stderr
