"""Streaming: peak memory stays under (inputs + 3) x the largest tensor + 300 MB on a model larger than that bound;
output is sharded with an index; a third-party method plugs in through the entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from .tiny import llama_config, llama_tensors, load, perturb, save_model

REPO = Path(__file__).resolve().parents[2]
MB = 2**20


def synthetic_model(path: Path, n_tensors: int, numel: int, base: torch.Tensor, noise: torch.Tensor, scale: float) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["Synthetic"], "num_hidden_layers": n_tensors}))
    tensors = {f"model.layers.{i}.w": (base + scale * noise).roll(i) for i in range(n_tensors)}
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.slow
def test_peak_rss_stays_under_inputs_plus_3_largest_tensors_plus_300mb(tmp_path):
    numel = 4 * MB  # 16 MB float32 tensors
    n_tensors = 26  # 416 MB per model: each model alone is larger than the 380 MB bound
    g = torch.Generator().manual_seed(0)
    base, noise = torch.randn(numel, generator=g), torch.randn(numel, generator=g)
    for i, name in enumerate(["base", "a"]):
        synthetic_model(tmp_path / name, n_tensors, numel, base, noise, 0.01 * (i + 1))
    del base, noise
    config = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 0.5, "density": 0.5}}],
    }
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(config))
    child = textwrap.dedent(
        f"""
        import resource, sys
        from mlc.commands.merge.api import run_merge
        run_merge({str(tmp_path / 'ties.yml')!r}, {str(tmp_path / 'out')!r}, runs_root={str(tmp_path / 'runs')!r}, max_shard_bytes=300 * 2**20)
        hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm)
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    # getrusage's ru_maxrss of a fresh child also counts the RSS its parent (this pytest process) had
    # at fork time, which Linux carries across exec; VmHWM is the same peak counter for the child's own
    # address space only. Both are printed; the child's own peak is the one asserted.
    rusage_kb, hwm_kb = map(int, done.stdout.split()[-2:])
    peak = hwm_kb * 1024
    assert rusage_kb >= hwm_kb
    largest = numel * 4
    model_bytes = n_tensors * largest
    bound = (2 + 3) * largest + 300 * MB  # 2 inputs: the base and one model
    assert model_bytes > bound  # the proof would be empty otherwise
    assert peak < bound, f"peak RSS {peak / MB:.0f} MB over the bound {bound / MB:.0f} MB"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2  # 300 MB shards of 16 MB tensors: 18 + 8
    out = load(tmp_path / "out")
    assert len(out) == n_tensors and out["model.layers.3.w"].dtype == torch.float32


def test_a_third_party_method_plugs_in_through_the_entry_point(tmp_path):
    """A package registering `mlc.merge_methods.v1` is used by `mlc merge` exactly like a built-in."""
    site = tmp_path / "site"
    (site / "halfway_method").mkdir(parents=True)
    (site / "halfway_method" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from mlc.contracts import Param, merge_method

            @merge_method("halfway", params=(Param("alpha", float, 0.5),), base="required", min_models=1, max_models=1)
            def halfway(models, base, params, rng=None):
                \"\"\"base + alpha * (model - base).\"\"\"
                return base + params["alpha"] * (models[0] - base)
            """
        )
    )
    dist = site / "halfway_method-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: halfway-method\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mlc.merge_methods.v1]\nhalfway = halfway_method:halfway\n")
    cfg = llama_config(layers=1)
    base = llama_tensors(cfg, 0)
    save_model(tmp_path / "base", cfg, base)
    save_model(tmp_path / "tuned", cfg, perturb(base, 1))
    (tmp_path / "m.yml").write_text(
        yaml.safe_dump({"merge_method": "halfway", "base_model": str(tmp_path / "base"), "models": [{"model": str(tmp_path / "tuned")}], "parameters": {"alpha": 0.25}})
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "MLC_RUNS_DIR": str(tmp_path / "runs")}
    done = subprocess.run([sys.executable, "-m", "mlc", "merge", str(tmp_path / "m.yml"), "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    got, tuned = load(tmp_path / "out"), load(tmp_path / "tuned")
    for k in base:
        assert torch.allclose(got[k], base[k] + 0.25 * (tuned[k] - base[k]), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mapped_inputs_merge_as_read_ones_and_a_method_writing_into_them_leaves_the_files_unchanged(dtype, tmp_path, monkeypatch):
    from mlc.commands.merge import executor
    from mlc.commands.merge.api import run_merge

    cfg = llama_config()
    base = llama_tensors(cfg, 0, dtype)
    paths = [save_model(tmp_path / n, cfg, t) for n, t in (("base", base), ("a", perturb(base, 1)), ("b", perturb(base, 2)))]
    before = [(p / "model.safetensors").read_bytes() for p in paths]
    monkeypatch.setattr(executor, "MAPPED_IN_FLIGHT", 2**62)  # map even these tiny tensors
    config = {"merge_method": "ties", "base_model": str(paths[0]),  # TIES combines into the base tensor in place
              "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in paths[1:]]}
    run_merge(config, tmp_path / "mapped", runs_root=tmp_path / "runs")
    assert [(p / "model.safetensors").read_bytes() for p in paths] == before
    monkeypatch.setattr(executor, "read_input", lambda model, name, min_mapped: model.read(name))
    run_merge(config, tmp_path / "read", runs_root=tmp_path / "runs")
    mapped, read = load(tmp_path / "mapped"), load(tmp_path / "read")
    assert mapped.keys() == read.keys() and all(torch.equal(mapped[k], read[k]) for k in read)
