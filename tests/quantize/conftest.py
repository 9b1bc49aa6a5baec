"""Fixtures for the quantize tests: a small random model with mlc's bundled tokenizer, saved as an HF directory."""

from __future__ import annotations

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
