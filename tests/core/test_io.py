"""Tensor I/O: safetensors round trips against the reference library, sharding, atomic outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlc.errors import InputError
from mlc.io.atomic import atomic_output_dir
from mlc.io.hfdir import copy_tokenizer_files, require_model_dir
from mlc.io.safetensors_reader import ModelTensors
from mlc.io.safetensors_writer import ShardedWriter, save_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn]


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        x = torch.randn(3, 5, generator=g) * 10
        out[f"t{i}"] = x.to(dtype) if dtype.is_floating_point else (x > 0 if dtype == torch.bool else x.to(dtype))
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_writer_output_reads_back_identically_with_the_reference_library(tmp_path: Path):
    tensors = sample_tensors()
    save_tensors(tensors, tmp_path)
    ref = load_file(tmp_path / "model.safetensors")
    assert ref.keys() == tensors.keys()
    for name, t in tensors.items():
        assert ref[name].dtype == t.dtype and ref[name].shape == t.shape
        assert torch.equal(ref[name].reshape(-1).view(torch.uint8), t.reshape(-1).contiguous().view(torch.uint8))


def test_reader_matches_the_reference_library_on_files_it_wrote(tmp_path: Path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "who": "ref"})
    with ModelTensors(tmp_path) as mt:
        assert set(mt.names()) == set(tensors)
        assert mt.metadata()["who"] == "ref"
        for name, t in tensors.items():
            got = mt.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).contiguous().view(torch.uint8))


def test_sharding_splits_by_size_writes_an_index_and_reads_back(tmp_path: Path):
    tensors = {f"layer.{i}.weight": torch.full((256,), float(i)) for i in range(10)}  # 512 bytes each in bf16
    files = save_tensors(tensors, tmp_path, max_shard_bytes=3 * 512, dtype=torch.bfloat16)
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10 * 512
    assert set(index["weight_map"]) == set(tensors)
    merged = {}
    for f in files:
        merged.update(load_file(tmp_path / f))
    with ModelTensors(tmp_path) as mt:
        for name, t in tensors.items():
            assert merged[name].dtype == torch.bfloat16
            assert torch.equal(mt.read(name, torch.float32), t)


def test_writer_accepts_tensors_in_any_order_from_threads(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"w{i}": torch.randn(64, 33) for i in range(16)}
    plan = [(n, torch.float32, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(tmp_path, plan, max_shard_bytes=64 * 33 * 4 * 5) as w:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: w.write(n, tensors[n]), reversed(list(tensors))))
    with ModelTensors(tmp_path) as mt:
        for n, t in tensors.items():
            assert torch.equal(mt.read(n), t)


def write_valid(path: Path) -> None:
    save_file({"a": torch.arange(100, dtype=torch.float32)}, path)


def test_truncated_file_gets_a_one_line_error(tmp_path: Path):
    f = tmp_path / "model.safetensors"
    write_valid(f)
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(InputError, match="tensor 'a' ends at byte 400 but the data section holds 360"):
        ModelTensors(f)


def test_header_that_lies_about_sizes_is_rejected(tmp_path: Path):
    f = tmp_path / "model.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 40]}}).encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 400)
    with pytest.raises(InputError, match="claims 40 bytes but shape \\[100\\] of F32 needs 400"):
        ModelTensors(f)
    f.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match="header length"):
        ModelTensors(f)
    f.write_bytes((4).to_bytes(8, "little") + b"nope")
    with pytest.raises(InputError, match="header is not JSON"):
        ModelTensors(f)


def test_missing_paths_and_non_model_directories_get_clear_errors(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        require_model_dir(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no config.json"):
        require_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InputError, match="PyTorch pickles"):
        require_model_dir(tmp_path)
    with pytest.raises(InputError, match="holds no .safetensors"):
        ModelTensors(tmp_path)


def test_index_naming_a_missing_shard_is_an_error(tmp_path: Path):
    write_valid(tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(InputError, match="missing shard model-00002-of-00002"):
        ModelTensors(tmp_path)


def test_atomic_output_dir_leaves_nothing_behind_on_failure(tmp_path: Path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(final) as staging:
            (staging / "x").write_text("1")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(final) as staging:
        (staging / "x").write_text("1")
    assert (final / "x").read_text() == "1"


def test_tokenizer_files_are_copied_through(tmp_path: Path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "unrelated.txt"):
        (src / name).write_text(name)
    assert sorted(copy_tokenizer_files(src, dst)) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert not (dst / "unrelated.txt").exists()
