"""`mlc serve` serves an upcycled model: SmolLM2 upcycled to a Mixtral continues a prompt exactly as the dense
model does (greedy), through the OpenAI completions endpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from mlc.models.generate import generate
from mlc.models.tokenizer import load_tokenizer
from mlc.servers import wait_healthy

from .upcycle_helpers import upcycle

PROMPT = "The three primary colors are"


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.realmodel
def test_serve_continues_like_the_dense_model(smollm2_dir, smollm2_model, tmp_path, runs_root):
    out = upcycle(smollm2_dir, tmp_path / "moe", experts=2, top_k=2)
    tokenizer = load_tokenizer(smollm2_dir)
    expected = tokenizer.decode(generate(smollm2_model, tokenizer.encode(PROMPT), max_new_tokens=8)[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlc", "serve", str(out), "--port", str(port), "--kv-cache-memory", "64MiB", "--max-model-len", "256"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLC_RUNS_DIR": str(runs_root)},
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=300, what="mlc serve")
        reply = post(port, "/v1/completions", {"model": "moe", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert reply["choices"][0]["text"] == expected, (reply, expected)
    assert reply["usage"]["completion_tokens"] == 8
