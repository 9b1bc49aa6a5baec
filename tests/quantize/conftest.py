"""Fixtures for the quantize tests: a small random model with mlc's bundled tokenizer, saved as an HF directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled tiny Llama config (hidden 128, 4 layers, vocab 2048) with seeded random weights and the tiny tokenizer."""
    import torch

    from mlc.data import tiny_model_dir
    from mlc.io.hfdir import read_config
    from mlc.models import build_model, save_model

    model = build_model(read_config(tiny_model_dir()), seed=0, dtype=torch.float32)
    with torch.no_grad():  # larger than the init's 0.02 so that 4 bits make a visible difference
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.08, generator=torch.Generator().manual_seed(i))
    return save_model(model, tmp_path_factory.mktemp("small") / "model", tokenizer_from=tiny_model_dir())


CALIB = ["--samples", "8", "--seq-len", "64"]
SCHEMES = {
    "int8": [],
    "int4": ["--group-size", "32"],
    "int4-asym": ["--group-size", "64", "--asymmetric"],
    "nf4": [],
    "fp4": [],
    "fp8": [],
    "llm-int8": CALIB,
    "gptq": ["--act-order", *CALIB],
    "gptq-int8": ["--bits", "8", *CALIB],
    "awq": ["--group-size", "32", *CALIB],
    "daq": CALIB,
    "mixed": ["--target-bits", "5", *CALIB],
}
# quant_method of each output; None: mlc's own layout, which has none so that other tools refuse it.
LAYOUTS = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "llm-int8": None, "daq": None}


@pytest.fixture(scope="session")
def outputs(small_model_dir, tmp_path_factory, run_mlc_module):
    made = {}
    for name, flags in SCHEMES.items():
        out = tmp_path_factory.mktemp("q") / name
        scheme = name.split("-asym")[0].replace("gptq-int8", "gptq")
        evaluate = [] if name == "int4" else ["--no-eval"]  # one run measures perplexity; the rest save the time
        code, stdout, stderr = run_mlc_module("quantize", small_model_dir, "--scheme", scheme, "--out", out, "--json", *evaluate, *flags)
        assert code == 0, stderr
        made[name] = (out, json.loads(stdout))
    return made


@pytest.fixture(scope="session")
def run_mlc_module(tmp_path_factory):
    from mlc import options
    from mlc.cli import main

    runs = tmp_path_factory.mktemp("runs")

    def run(*args):
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        saved = options.get()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(["--runs-dir", str(runs), *map(str, args)])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                options.set_options(saved)
        return code, out.getvalue(), err.getvalue()

    run.runs_dir = runs
    return run
