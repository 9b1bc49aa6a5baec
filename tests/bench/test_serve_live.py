"""`mlc bench serve --server "mlc serve ..."` on a tiny model made by mlc: measured, stopped, and linked by lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(runs root, model dir): the bundled tiny config with random weights, int8-quantised by `mlc quantize` (so it has a producer run)."""
    from mlc import data, options
    from mlc.cli import main
    from mlc.io.hfdir import read_config
    from mlc.models import build_model, save_model

    tmp = tmp_path_factory.mktemp("bench-live")
    base = save_model(build_model(read_config(data.tiny_model_dir()), seed=0), tmp / "tiny", tokenizer_from=data.tiny_model_dir())
    saved = options.get()
    try:
        main(["--runs-dir", str(tmp / "runs"), "quantize", str(base), "--scheme", "int8", "--out", str(tmp / "tiny-int8"), "--no-eval"])
    except SystemExit as e:
        assert e.code == 0
    finally:
        options.set_options(saved)
    return tmp / "runs", tmp / "tiny-int8"


def test_bench_starts_mlc_serve_measures_it_and_links_the_result_to_the_model(quantized_tiny, run_mlc, tmp_path):
    runs, model = quantized_tiny
    server = f"mlc serve {model} --port {{port}} --kv-cache-memory 16MiB --max-model-len 256"
    code, out, err = run_mlc("--runs-dir", runs, "bench", "serve", "--server", server, "--dataset", "random", "--input-len", "32",
                             "--output-len", "8", "-n", "8", "--max-concurrency", "4", "--goodput", "ttft:60000",
                             "--plot", tmp_path / "plots", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_output_tokens"] == 8 * 8  # random prompts ignore EOS, and the server's usage says so
    assert abs(result["total_input_tokens"] - 8 * 32) <= 8  # re-encoded random text lands within a token of its length
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["max_concurrent_requests"] <= 4
    cold = result["cold_start"]
    assert 0 < cold["healthy_s"] < cold["first_token_s"]
    assert result["server_cpu_s"] > 0 and result["output_tokens_per_server_cpu_s"] == pytest.approx(64 / result["server_cpu_s"])
    assert result["tokenizer_id"] == str(model / "tokenizer.json")  # the served mlc model's, found from --server
    for png in ("latency_cdf.png", "timeline.png", "throughput.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The server ran its own run (stopped cleanly by SIGTERM), and the bench run leads back through lineage to
    # the quantize run and the tiny model it read.
    code, out, _ = run_mlc("--runs-dir", runs, "runs", "ls", "--json")
    listed = {r["command"]: r for r in json.loads(out)}
    assert listed["serve"]["status"] == "completed" and listed["bench"]["status"] == "completed"
    code, out, _ = run_mlc("--runs-dir", runs, "runs", "lineage", f"run:{result['run']}", "--json")
    tree = json.loads(out)
    (model_input,) = [i for i in tree["inputs"] if i["role"] == "model"]
    assert model_input["command"] == "quantize" and model_input["inputs"][0]["path"].endswith("tiny")
