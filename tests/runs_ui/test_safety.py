"""`mlc runs ui` is safe by default: loopback only, read-only, no path from the URL, 4xx (never 5xx) for hostile requests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

SECRET = "top secret contents"

TRAVERSALS = [
    "/runs/..", "/runs/../../etc/passwd", "/runs/..%2F..%2Fetc%2Fpasswd", "/runs/%2e%2e/%2e%2e/secret.txt", "/runs/..%252F..%252Fsecret.txt",
    "/runs/....//....//secret.txt", "/runs/%00", "/runs/run.json", "/runs/index.sqlite", "/runs/secret.txt", "/runs/..\\..\\secret.txt",
    "/static/../../secret.txt", "/static/%2e%2e/%2e%2e/secret.txt", "/static/style.css/../../secret.txt", "/static/run.json",
    "/runs/{train}/../../secret.txt", "/runs/{train}/lineage/../../../secret.txt", "/runs/{train}/artifacts/model/manifest.json",
    "//etc/passwd", "/%2e%2e/secret.txt", "/runs/" + "a" * 5000, "/runs/%ff%fe", "/runs/\u202e",
]
QUERIES = [
    {"limit": "-1"}, {"limit": "abc"}, {"limit": "9" * 40}, {"command": "x" * 500}, {"status": "'; DROP TABLE runs; --"},
    {"q": "\x00"}, {"q": "%"}, {"command": "../../secret.txt"},
]


def test_traversal_attempts_never_reach_a_file(client, chain):
    (chain.root.parent / "secret.txt").write_text(SECRET)
    (chain.root / "secret.txt").write_text(SECRET)
    for raw in TRAVERSALS:
        r = client.get(raw.replace("{train}", chain.train))
        if r.url.path in ("/", f"/runs/{chain.train}"):  # the client removed the dot segments: an ordinary page
            assert r.status_code == 200, raw
        else:
            assert 400 <= r.status_code < 500, (raw, r.status_code)
        assert SECRET not in r.text and "root:x:0" not in r.text, raw


def test_hostile_query_strings_and_run_ids_get_4xx(client, chain):
    for params in QUERIES:
        r = client.get("/", params=params)
        assert r.status_code in (200, 422), (params, r.status_code)
    for path, params in [(f"/runs/{chain.train}", {"compare": "nope"}), (f"/runs/{chain.train}", [("compare", "x")] * 50),
                         (f"/runs/{chain.train}/lineage", {"artifact": "../../secret.txt"}), (f"/runs/{chain.train}/lineage", {"artifact": "nope"}),
                         ("/curves", {}), ("/curves", {"run": "../.."}), ("/runs/does-not-exist", {}), ("/runs/does-not-exist/lineage", {})]:
        r = client.get(path, params=params)
        assert 400 <= r.status_code < 500, (path, params, r.status_code)


def test_only_reading_is_allowed_and_nothing_in_the_runs_root_changes(client, chain):
    before = {p: p.stat().st_mtime_ns for p in chain.root.rglob("*")}
    for method in ("post", "put", "delete", "patch"):
        assert getattr(client, method)(f"/runs/{chain.train}").status_code == 405
    for path in ("/", f"/runs/{chain.train}", f"/runs/{chain.train}/lineage", "/static/style.css"):
        assert client.get(path).status_code == 200
    assert {p: p.stat().st_mtime_ns for p in chain.root.rglob("*")} == before


def test_pages_forbid_scripts_and_other_hosts(client, chain):
    r = client.get("/")
    assert "script-src" not in r.headers["content-security-policy"] and "default-src 'none'" in r.headers["content-security-policy"]
    assert client.get("/", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding
    damaged = chain.root / "20990101-000000-train-badbad"
    damaged.mkdir()
    (damaged / "run.json").write_text("{not json")
    assert client.get("/").status_code == 200 and "badbad" in client.get("/").text
    assert client.get(f"/runs/{damaged.name}").status_code == 422


@pytest.mark.slow
def test_the_command_binds_loopback_by_default_and_says_where(runs_root, chain, tmp_path):
    env = {**os.environ, "MLC_RUNS_DIR": str(runs_root)}
    proc = subprocess.Popen([sys.executable, "-m", "mlc", "runs", "ui", "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        url = line.split("mlc runs ui: ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as page:
                    assert chain.train in page.read().decode()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):  # not reachable on the machine's other addresses
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((other, port)) != 0
        busy = subprocess.run([sys.executable, "-m", "mlc", "runs", "ui", "--port", str(port)], capture_output=True, text=True, env=env, timeout=60)
        assert busy.returncode != 0 and "cannot listen on 127.0.0.1" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("args, message", [(["--port", "70000"], "not a TCP port"), (["--host", "no.such.host.invalid"], "not an address")])
def test_bad_addresses_are_one_line_errors(run_mlc, args, message):
    run_mlc.runs_dir.mkdir()
    code, out, err = run_mlc("runs", "ui", *args)
    assert code != 0 and message in err and "Traceback" not in err
