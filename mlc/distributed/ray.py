"""Ray, for work that spreads over processes or machines (merge searches, serving replicas): join a running Ray
cluster or start a local instance, keep a pool of actors over its CPUs, and shut down cleanly.

Ray is an optional extra (`pip install 'mlc[ray]'`); nothing here imports it until a function runs, and
`require()` turns its absence into a one-line error. Past what these few functions do, callers use Ray's
own API: mlc does not wrap it.

    with ray_session("local"):                      # or "auto", "ray://head:10001", "10.0.0.5:6379"
        pool = actor_pool(Worker, (arg,), actors=4)  # Worker is a plain class; each actor gets one CPU
        results = list(pool.map(lambda a, x: a.run.remote(x), inputs))  # in the order of `inputs`
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator

from mlc.errors import MlcError

LOCAL = "local"  # the address that starts a Ray instance on this machine for the session's lifetime


def require() -> Any:
    """The ray module, or a one-line MlcError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MlcError("Ray is not installed", "install the extra: pip install 'mlc[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str, num_cpus: int | None = None) -> Iterator[Any]:
    """Connected to the Ray cluster at `address` (or a fresh local instance for "local") inside the block.

    On exit mlc disconnects, and a local instance it started stops with its worker processes. A cluster
    that cannot be reached is a one-line MlcError.
    """
    ray = require()
    if ray.is_initialized():  # a caller (or a test) already connected this process: use that, leave it be
        yield ray
        return
    if address != LOCAL:
        _probe(address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address == LOCAL:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        raise MlcError(f"cannot connect to the Ray cluster at {address}: {first}", "start one with `ray start --head`, or pass --ray local") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _probe(address: str) -> None:
    """A one-line MlcError if host:port (or ray://host:port) takes no TCP connection within 5 s.

    ray.init retries an address that does not answer for minutes with a warning every few seconds;
    a quick TCP connect turns the common mistakes (wrong host or port, cluster not started) into one line.
    "auto" (the address Ray recorded on this machine) is left to Ray, which fails fast when there is none.
    """
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise MlcError(
            f"cannot connect to the Ray cluster at {address}: {e.strerror or e.__class__.__name__}",
            "start one with `ray start --head`, or pass --ray local",
        ) from None


def cluster_cpus() -> int:
    """CPUs the connected Ray cluster offers (at least 1)."""
    ray = require()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def actor_pool(cls: type, args: tuple[Any, ...] = (), actors: int = 1, num_cpus: float = 1) -> Any:
    """A ray.util.ActorPool of `actors` instances of cls(*args), each reserving num_cpus CPUs."""
    ray = require()
    from ray.util import ActorPool

    remote = ray.remote(num_cpus=num_cpus)(cls)
    return ActorPool([remote.remote(*args) for _ in range(actors)])
