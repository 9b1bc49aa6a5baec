"""The small shared helpers: sizes, keyed random streams, documents from text or JSONL, waiting for a server."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mlc.errors import InputError, MlcError


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("1e9", 10**9), (" 512 mb", 512 * 10**6),
                                            ("300", 300), ("1.5k", 1500)])
def test_sizes_read_decimal_and_binary_units(text, expected):
    from mlc.units import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5 parsecs", "-3GB"])
def test_a_size_that_is_not_one_is_a_value_error(text):
    from mlc.units import parse_size

    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0", "0GB", "5QB"])
def test_a_shard_size_that_is_not_positive_is_a_usage_error_naming_the_option(text):
    import typer

    from mlc.cliutil import parse_shard_size

    with pytest.raises(typer.BadParameter) as caught:
        parse_shard_size(text)
    assert caught.value.param_hint == "--max-shard-size"


def test_a_keyed_stream_depends_on_seed_and_key_only():
    from mlc.rng import keyed_generator

    # The stream of (seed 7, "model.norm.weight") is fixed: the seed is the first 8 bytes of its BLAKE2b digest.
    digest = hashlib.blake2b(b"7:model.norm.weight", digest_size=8).digest()
    expected = torch.rand(4, generator=torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1)))
    assert torch.equal(torch.rand(4, generator=keyed_generator(7, "model.norm.weight")), expected)
    assert not torch.equal(torch.rand(4, generator=keyed_generator(7, "model.norm.bias")), expected)
    assert not torch.equal(torch.rand(4, generator=keyed_generator(8, "model.norm.weight")), expected)


def test_documents_come_from_text_or_jsonl_with_the_line_named_on_error(tmp_path: Path):
    from mlc.io.texts import read_texts

    (tmp_path / "a.txt").write_text("one document\nof two lines")
    assert read_texts(tmp_path / "a.txt") == ["one document\nof two lines"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"messages": [{"role": "user", "content": "hi"}, {"content": "yo"}]}\n')
    assert read_texts(tmp_path / "b.jsonl", chat=True) == ["x", "hi\nyo"]
    with pytest.raises(InputError, match=r"b.jsonl:3 has no string field 'text'"):
        read_texts(tmp_path / "b.jsonl")
    with pytest.raises(InputError) as e:
        read_texts(tmp_path / "missing.jsonl", option="--calib")
    assert "--calib" in e.value.one_line()


def test_waiting_for_a_server_returns_once_health_answers_and_fails_when_the_process_dies():
    from mlc.servers import wait_healthy

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert wait_healthy(f"http://127.0.0.1:{server.server_port}/health", timeout=10) < 10
        with pytest.raises(MlcError, match="was not ready after 1s"):
            wait_healthy(f"http://127.0.0.1:{server.server_port}/nothing", timeout=1)
    finally:
        server.shutdown()
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(MlcError, match="the server exited with code 3 before it was ready"):
        wait_healthy("http://127.0.0.1:9/health", dead, timeout=10)
