"""Fixtures of the upcycle tests (helpers live in upcycle_helpers.py, a name no other test area uses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .upcycle_helpers import PROMPTS, make_dense, make_finetune


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dense(tmp_path_factory.mktemp("dense") / "llama")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dense(tmp_path_factory.mktemp("dense") / "llama-tied", tie=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dense(tmp_path_factory.mktemp("dense") / "qwen2", family="qwen2")


@pytest.fixture(scope="session")
def finetunes(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("finetunes")
    return [make_finetune(tiny_llama, root / f"ft{i}", seed=100 + i) for i in range(2)]


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "experts.yaml"
    path.write_text(PROMPTS)
    return path
