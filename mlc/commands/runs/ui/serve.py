"""Start `mlc runs ui`'s server: bind the socket first (so a busy port is a one-line error and --port 0 works), then uvicorn."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from mlc import console
from mlc.errors import InputError, MlcUsageError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> list[str]:
    """Host headers the app answers: the loopback names, or anything when bound to every address (0.0.0.0, ::)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    names = {"127.0.0.1", "localhost", "[::1]", host, f"[{host}]" if ":" in host else host}
    return sorted(names)


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise MlcUsageError(f"--port {port} is not a TCP port", "give 0-65535 (0 picks a free one)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise MlcUsageError(f"--host {host!r} is not an address of this machine", "the default, 127.0.0.1, serves this machine only") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}", "pick another --port (0 picks a free one) or stop the server using it") from None
    sock.listen(128)
    return sock


def serve(root: Path, host: str, port: int) -> None:
    import uvicorn

    from mlc.commands.runs.ui.app import create_app

    if not root.is_dir():
        raise InputError(f"no runs root at {root}", "run a command first (e.g. `mlc demo`), or point --runs-dir / MLC_RUNS_DIR at one")
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(host):
        console.warn(f"serving on {host}: the UI has no login, so anyone who can reach this address can read every run under {root}")
    console.info(f"mlc runs ui: http://{shown}:{bound}/  (runs root {root}; read-only; Ctrl-C stops it)")
    config = uvicorn.Config(create_app(root, allowed_hosts(host)), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
