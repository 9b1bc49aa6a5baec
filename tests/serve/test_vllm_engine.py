"""`mlc serve --engine vllm` against a fake `vllm` executable on PATH that checks its arguments.

vLLM cannot run on this CPU machine, so the fake stands in: it parses its command line with the
option names and choices of vLLM's own `vllm serve` (docs.vllm.ai, engine and frontend arguments;
argparse refuses anything else, as vLLM does), checks that MODEL and every --lora-modules path are
directories vLLM could open, records what it received, and then exits or serves /health until SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FAKE_VLLM = textwrap.dedent('''\
    import argparse, http.server, json, os, signal, sys, threading
    from pathlib import Path

    record = Path(os.environ["FAKE_VLLM_RECORD"])
    if sys.argv[1:2] != ["serve"]:
        sys.exit("fake vllm: only `vllm serve` is expected")
    p = argparse.ArgumentParser(prog="vllm serve")
    p.add_argument("model_tag")
    p.add_argument("--host"); p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    for flag in ("--max-model-len", "--block-size", "--max-num-batched-tokens", "--max-num-seqs", "--kv-cache-memory-bytes",
                 "--max-loras", "--tensor-parallel-size"):
        p.add_argument(flag, type=int)
    p.add_argument("--max-lora-rank", type=int, choices=[1, 8, 16, 32, 64, 128, 256, 320, 512])
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    p.add_argument("--enforce-eager", action="store_true"); p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--lora-modules", nargs="+")
    p.add_argument("--api-key")
    args = p.parse_args(sys.argv[2:])
    assert (Path(args.model_tag) / "config.json").is_file(), "MODEL is not a model directory"
    for module in args.lora_modules or []:
        name, path = module.split("=", 1)
        assert (Path(path) / "adapter_config.json").is_file(), f"{path} is not an adapter"
        assert args.enable_lora, "--lora-modules without --enable-lora"
    got = {"argv": sys.argv[1:], "api_key_env": os.environ.get("VLLM_API_KEY"), "pid": os.getpid()}
    record.write_text(json.dumps(got))
    if os.environ.get("FAKE_VLLM_MODE") != "serve":
        sys.exit(0)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a):
            pass

    server = http.server.HTTPServer((args.host, args.port), Health)
    def stop(signum, frame):
        record.write_text(json.dumps({**got, "signal": signum}))
        threading.Thread(target=server.shutdown).start()
    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
''')


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts the fake `vllm` first on PATH; returns the file it records its arguments in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(f"#!{sys.executable}\n{FAKE_VLLM}")
    exe.chmod(0o755)
    record = tmp_path / "vllm_got.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return record


def write_model(path: Path, config: dict | None = None) -> Path:
    """A model directory as far as vLLM's checks go: config.json and a safetensors file (not loaded by the fake)."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(path / "model.safetensors"))
    return path


def write_adapter(path: Path, rank: int, base: Path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "base_model_name_or_path": str(base)}))
    save_file({"a": np.zeros(2, dtype=np.float32)}, str(path / "adapter_model.safetensors"))
    return path


def read_runs(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs.glob("*/run.json"))]


def test_vllm_gets_the_model_options_and_adapters_and_the_run_records_lineage(tmp_path, fake_vllm, run_mlc):
    from mlc.runs import open_run

    with open_run("quantize", {}, runs_root=run_mlc.runs_dir) as producer:  # the artifact served, made by an earlier run
        with producer.artifact("model") as staging:
            staging.rmdir()
            write_model(staging, {"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}})
    base = write_model(tmp_path / "base")
    sql = write_adapter(tmp_path / "sql", rank=12, base=base)
    code, out, err = run_mlc(
        "serve", "latest:quantize", "--engine", "vllm", "--port", "8123", "--served-model-name", "m", "--dtype", "bfloat16",
        "--max-model-len", "2048", "--max-running", "64", "--no-prefix-caching", "--no-compile", "--kv-cache-memory", "2GiB",
        "--api-key", "secret", "--lora", f"sql={sql}", "--vllm-arg=--tensor-parallel-size", "--vllm-arg", "2",
    )
    assert code == 0, err
    got = json.loads(fake_vllm.read_text())
    model = Path(producer.data["artifacts"]["model"]["path"])
    assert got["argv"] == [
        "serve", str(model), "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "m", "--dtype", "bfloat16",
        "--max-model-len", "2048", "--max-num-seqs", "64", "--kv-cache-memory-bytes", str(2 << 30),
        "--no-enable-prefix-caching", "--enforce-eager", "--enable-lora", "--max-loras", "1", "--max-lora-rank", "16",
        "--lora-modules", f"sql={sql}", "--tensor-parallel-size", "2",
    ]
    assert got["api_key_env"] == "secret"  # through the environment: argv is visible to everyone in ps
    run = next(r for r in read_runs(run_mlc.runs_dir) if r["command"] == "serve")
    assert run["status"] == "completed" and run["config"]["engine"] == "vllm" and run["config"]["api_key"] == "set"
    model_input, adapter_input = run["inputs"]
    assert (model_input["role"], model_input["producer_run"]) == ("model", producer.id)
    assert adapter_input["role"] == "adapter" and adapter_input["hash"]
    assert run["summary"]["vllm_pid"] == got["pid"] and run["summary"]["vllm_exit_code"] == 0


def test_an_adapter_as_model_serves_its_base_with_the_adapter_under_the_served_name(tmp_path, fake_vllm, run_mlc):
    base = write_model(tmp_path / "base")
    adapter = write_adapter(tmp_path / "tuned", rank=64, base=base)
    code, _, err = run_mlc("serve", str(adapter), "--engine", "vllm")
    assert code == 0, err
    argv = json.loads(fake_vllm.read_text())["argv"]
    assert argv[1] == str(base) and argv[argv.index("--served-model-name") + 1] == "base"
    assert argv[argv.index("--lora-modules") + 1] == f"tuned={adapter}" and argv[argv.index("--max-lora-rank") + 1] == "64"


@pytest.mark.parametrize("args, message", [
    (["--threads", "2"], "--threads has no vLLM equivalent"),
    (["--kv-cache-memory", "0.3"], "fraction of free RAM"),
    (["--lora", "noequals"], "is not NAME=PATH"),
])
def test_options_vllm_cannot_take_are_refused_before_vllm_starts(tmp_path, fake_vllm, run_mlc, args, message):
    code, _, err = run_mlc("serve", str(write_model(tmp_path / "m")), "--engine", "vllm", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not fake_vllm.exists()


def test_mlc_quantisation_layout_is_refused_with_a_hint(tmp_path, fake_vllm, run_mlc):
    model = write_model(tmp_path / "daq", {"model_type": "llama", "quantization_config": {"mlc": {"format_version": 2}}})
    code, _, err = run_mlc("serve", str(model), "--engine", "vllm")
    assert code == 1 and "mlc's own quantisation layout" in err and "leave out --engine" in err
    assert not fake_vllm.exists()


def test_missing_vllm_is_one_line(tmp_path, monkeypatch, run_mlc):
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm anywhere
    code, _, err = run_mlc("serve", str(write_model(tmp_path / "m")), "--engine", "vllm")
    assert code == 1 and err.strip().count("\n") == 0 and "vLLM, which is not installed" in err and "pip install vllm" in err


def test_vllm_failing_is_an_error_and_a_failed_run(tmp_path, fake_vllm, run_mlc):
    code, _, err = run_mlc("serve", str(write_model(tmp_path / "m")), "--engine", "vllm", "--vllm-arg", "--no-such-flag")
    assert code == 1 and "vLLM exited with code 2" in err
    (run,) = read_runs(run_mlc.runs_dir)
    assert run["status"] == "failed" and run["summary"]["vllm_exit_code"] == 2


def test_vllm_only_options_with_the_other_engine_are_refused(tmp_path, run_mlc):
    code, _, err = run_mlc("serve", str(tmp_path), "--vllm-arg", "--enforce-eager")
    assert code == 2 and "--vllm-arg needs --engine vllm" in err
    code, _, err = run_mlc("serve", str(tmp_path), "--engine", "vllm", "--allow-runtime-lora")
    assert code == 2 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in err


def test_sigterm_is_forwarded_to_vllm_and_the_run_completes(tmp_path, fake_vllm):
    from tests.serve.conftest import free_port

    port = free_port()
    env = {**os.environ, "FAKE_VLLM_MODE": "serve", "MLC_RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.Popen([sys.executable, "-m", "mlc", "serve", str(write_model(tmp_path / "m")), "--engine", "vllm", "--port", str(port)],
                            env=env, stderr=subprocess.PIPE, text=True)
    from mlc.servers import wait_healthy

    wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert json.loads(fake_vllm.read_text())["signal"] == signal.SIGTERM
    (run,) = read_runs(tmp_path / "runs")
    assert run["status"] == "completed" and run["summary"]["vllm_exit_code"] == 0
