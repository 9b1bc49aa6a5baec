"""mlc.distributed.ray on a real local Ray instance: start, actor pool, join by address, shutdown, one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from mlc.errors import MlcError


class Square:
    def __init__(self, k: int):
        self.k = k

    def run(self, x: int) -> tuple[int, int]:
        return self.k * x * x, os.getpid()


@pytest.mark.slow
def test_local_instance_pool_join_by_address_and_shutdown():
    import ray

    from mlc.distributed.ray import LOCAL, actor_pool, cluster_cpus, ray_session

    with ray_session(LOCAL, num_cpus=2) as r:
        assert r is ray and ray.is_initialized() and cluster_cpus() == 2
        pool = actor_pool(Square, (3,), actors=2)
        out = list(pool.map(lambda a, x: a.run.remote(x), range(7)))
        assert [v for v, _ in out] == [3 * x * x for x in range(7)]  # in input order
        pids = {pid for _, pid in out}
        assert len(pids) == 2 and os.getpid() not in pids  # two actor processes, not this one
        # Another process joins the running instance by its address (what --ray HOST:PORT does on a cluster).
        address = ray.get_runtime_context().gcs_address
        code = f"from mlc.distributed.ray import ray_session, cluster_cpus\nwith ray_session({address!r}):\n    print(cluster_cpus())"
        joined = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0 and joined.stdout.split() == ["2"], joined.stderr[-2000:]
        with ray_session(LOCAL):  # already connected: reused, not shut down on exit
            assert ray.is_initialized()
        assert ray.is_initialized()
    assert not ray.is_initialized()


def test_unreachable_cluster_is_one_line_and_quick():
    from mlc.distributed.ray import ray_session

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(MlcError) as e:
            with ray_session(address):
                pass
        assert f"cannot connect to the Ray cluster at {address}" in e.value.one_line() and "ray start --head" in e.value.one_line()
    assert time.monotonic() - start < 15


def test_missing_ray_is_one_line(monkeypatch):
    import builtins

    from mlc.distributed.ray import require

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(MlcError) as e:
        require()
    assert e.value.one_line() == "Ray is not installed. install the extra: pip install 'mlc[ray]'"
