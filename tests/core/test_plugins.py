"""Plugins: a package installed from a temporary directory adds a command and a merge method; a broken
plugin is reported in one line and skipped; MLC_LOAD_PLUGINS limits what loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .conftest import run_mlc


def env_with(site: Path, **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": str(site), **extra}


def test_third_party_command_and_merge_method_appear(plugin_site: Path):
    proc = run_mlc("--help", env=env_with(plugin_site))
    assert "hello" in proc.stdout and "Say hello from a third-party plugin." in proc.stdout
    proc = run_mlc("hello", "--name", "mlc", env=env_with(plugin_site))
    assert proc.returncode == 0 and proc.stdout.strip() == "hello mlc"
    listed = json.loads(run_mlc("plugins", "--json", env=env_with(plugin_site)).stdout)
    method = [p for p in listed if p["kind"] == "merge_methods" and p["name"] == "elementwise_max"]
    assert method and method[0]["package"] == "mlc-hello" and method[0]["version"] == "0.3.1"
    assert method[0]["status"] == "ok"


def test_a_command_in_a_folder_without_init_py_is_listed_and_runs(plugin_site: Path):
    proc = run_mlc("--help", env=env_with(plugin_site))
    assert "Shout, from a folder without __init__.py" in proc.stdout
    proc = run_mlc("shout", "--word", "ok", env=env_with(plugin_site))
    assert proc.returncode == 0 and proc.stdout.strip() == "OK"


def test_third_party_merge_method_is_callable_through_the_registry(plugin_site: Path):
    code = (
        "import torch; from mlc import plugins\n"
        "f = plugins.load_one('merge_methods', 'elementwise_max')\n"
        "print(f([torch.tensor([1., 5.]), torch.tensor([3., 2.])]).tolist())"
    )
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env_with(plugin_site)})
    assert proc.stdout.strip() == "[3.0, 5.0]", proc.stderr


def test_a_plugin_of_the_wrong_type_is_reported_as_broken_in_one_line(plugin_site: Path, tmp_path: Path):
    listed = json.loads(run_mlc("plugins", "--json", env=env_with(plugin_site)).stdout)
    by_name = {(p["kind"], p["name"]): p for p in listed}
    assert by_name[("merge_methods", "elementwise_max")]["status"] == "ok"
    plain = by_name[("merge_methods", "plain_max")]
    assert plain["status"] == "failed"
    assert plain["error"].startswith("TypeError: function 'plain_max' is not a MergeMethod")
    scheme = by_name[("quant_schemes", "not_a_scheme")]
    assert scheme["status"] == "failed" and "is not a QuantScheme" in scheme["error"]
    (tmp_path / "m.yml").write_text("merge_method: plain_max\nmodels: [{model: a}, {model: b}]\n")
    proc = run_mlc("merge", str(tmp_path / "m.yml"), "--out", str(tmp_path / "out"), env=env_with(plugin_site), cwd=tmp_path)
    assert proc.returncode != 0 and "is not a MergeMethod" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_broken_plugin_is_reported_in_one_line_and_the_rest_keep_working(plugin_site: Path):
    listed = json.loads(run_mlc("plugins", "--json", env=env_with(plugin_site)).stdout)
    broken = [p for p in listed if p["name"] == "broken"][0]
    assert broken["status"] == "failed"
    assert broken["error"] == "ImportError: this plugin is broken on purpose"
    proc = run_mlc("broken", env=env_with(plugin_site))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "this plugin is broken on purpose" in proc.stderr
    assert run_mlc("hello", env=env_with(plugin_site)).returncode == 0
    assert run_mlc("runs", "ls", env=env_with(plugin_site)).returncode == 0


def test_mlc_load_plugins_limits_which_packages_load(plugin_site: Path):
    proc = run_mlc("--help", env=env_with(plugin_site, MLC_LOAD_PLUGINS=""))
    assert "hello" not in proc.stdout and "runs" in proc.stdout
    proc = run_mlc("--help", env=env_with(plugin_site, MLC_LOAD_PLUGINS="mlc-hello"))
    assert "hello" in proc.stdout
    proc = run_mlc("hello", env=env_with(plugin_site, MLC_LOAD_PLUGINS="someone-else"))
    assert proc.returncode == 2


def test_plugins_table_lists_builtin_commands_with_their_package():
    listed = json.loads(run_mlc("plugins", "--json").stdout)
    runs = [p for p in listed if p["kind"] == "commands" and p["name"] == "runs"][0]
    assert runs["package"] == "mlc" and runs["builtin"] and runs["status"] == "ok"
