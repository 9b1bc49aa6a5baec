"""The worked example plugin (plugins/mlc-geomedian): installed through its own entry point, used by
`mlc merge` like a built-in, and checked against a hand-computed geometric median."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import yaml

from tests.merge.tiny import llama_config, llama_tensors, load, save_model

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "mlc-geomedian"
# A convex quadrilateral's geometric median is where its diagonals cross: (0,0)-(5,3) and (4,0)-(1,5)
# meet at r = 12/34 along the second, i.e. (4 - 3r, 5r).
CORNERS = [(0.0, 0.0), (4.0, 0.0), (5.0, 3.0), (1.0, 5.0)]
MEDIAN = (4 - 3 * 12 / 34, 5 * 12 / 34)


def installed_site(tmp_path: Path) -> Path:
    """A site directory holding the plugin's dist-info, with the entry points its pyproject declares."""
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    dist = tmp_path / "site" / f"mlc_geomedian-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines: list[str] = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in entries.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return dist.parent


def plane(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A centre and two orthonormal directions in the space of tensors of this shape."""
    g = torch.Generator().manual_seed(seed)
    c, u, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    u = u / u.norm()
    v = v - (v * u).sum() * u
    return c, u, v / v.norm()


def test_mlc_merge_finds_the_geometric_median_through_the_plugins_entry_point(tmp_path: Path):
    cfg = llama_config(layers=1)
    shapes = {k: tuple(t.shape) for k, t in llama_tensors(cfg, 0).items()}
    frames = {k: plane(s, i) for i, (k, s) in enumerate(shapes.items())}
    for m, (a, b) in enumerate(CORNERS):
        save_model(tmp_path / f"m{m}", cfg, {k: (c + a * u + b * v).float() for k, (c, u, v) in frames.items()})
    (tmp_path / "soup.yml").write_text(yaml.safe_dump({
        "merge_method": "geometric_median",
        "models": [{"model": str(tmp_path / f"m{m}")} for m in range(len(CORNERS))],
        "parameters": {"tolerance": 1e-7},
        "dtype": "float32",
    }))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_site(tmp_path)), str(PLUGIN)]),
           "MLC_RUNS_DIR": str(tmp_path / "runs"), "MLC_LOAD_PLUGINS": "mlc-geomedian"}
    done = subprocess.run([sys.executable, "-m", "mlc", "merge", str(tmp_path / "soup.yml"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    got = load(tmp_path / "out")
    assert set(got) == set(shapes)
    for k, (c, u, v) in frames.items():
        expected = c + MEDIAN[0] * u + MEDIAN[1] * v
        assert torch.allclose(got[k].double(), expected, atol=2e-5 * float(expected.abs().max())), k
        mean = c + 2.5 * u + 2.0 * v  # the linear merge of the corners, visibly elsewhere
        assert (got[k].double() - mean).norm() > 0.45  # |(2.94, 1.76) - (2.5, 2)| = 0.50


def test_a_heavy_enough_input_is_the_median_and_weights_count_like_copies():
    sys.path.insert(0, str(PLUGIN))
    try:
        from mlc_geomedian import geometric_median
    finally:
        sys.path.remove(str(PLUGIN))
    points = [torch.zeros(3), torch.ones(3), torch.full((3,), 10.0)]
    # On a line the geometric median is the weighted median: 1 unweighted, 10 when it carries 3 of 5.
    assert torch.allclose(geometric_median(points), torch.ones(3), atol=1e-5)
    assert torch.allclose(geometric_median(points, params={"weight": [1, 1, 3]}), torch.full((3,), 10.0), atol=1e-4)
    with pytest.raises(ValueError, match="weight must be positive"):
        geometric_median(points, params={"weight": [1, 0, 1]})
