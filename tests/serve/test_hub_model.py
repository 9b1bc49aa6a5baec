"""`mlc serve ORG/NAME` serves a model from the Hugging Face cache offline, under its Hub id, and records revision and commit."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.serve.conftest import start_server

COMMIT = "c" * 40


@pytest.mark.slow
@pytest.mark.realmodel
def test_a_hub_id_is_served_from_the_offline_cache_under_its_id(tiny_chat_model, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_chat_model, repo / "snapshots" / COMMIT)  # the Hub cache's own layout
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    server = start_server("acme/tiny-chat", tmp_path / "serve", "--dtype", "float32", "--kv-cache-memory", "32MiB", "--max-model-len", "128")
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["acme/tiny-chat"]
        assert client.models.retrieve("acme/tiny-chat").id == "acme/tiny-chat"
        assert client.completions.create(model="acme/tiny-chat", prompt="Hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}).usage.completion_tokens == 3
    finally:
        assert server.stop() == 0
    run = json.loads(next(server.runs_dir.glob("*serve*/run.json")).read_text())
    assert run["inputs"][0]["hub"] == {"repo": "acme/tiny-chat", "revision": "main", "commit": COMMIT}
