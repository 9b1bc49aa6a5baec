"""In-memory snapshots that outlive the trainer (REFT, 2310.12670): the fast level below the disk checkpoints.

Every `checkpoint.snapshot_interval` steps each rank copies its own shard of the training state to host memory (the
tensors DCP would save, as this rank holds them: DTensor shards as their local tensors; plus its RNG states and the
data position): that copy is all the loop waits for. A thread then serialises it, exchanges the parity and hands the
bytes to the rank's *keeper*: a small process of its own on the same node, started by the rank in
a new session, so that a kill -9 of the rank, of its process group or of the launcher leaves it running. Keepers
hold the bytes in their own memory and import no torch.

Parity (RAID-5 style, one chunk per peer): rank r's bytes, zero-padded to the longest shard, are cut into world-1
chunks, one for each other rank j. Keeper j holds, besides its own rank's shard, P_j = XOR over r != j of rank r's
chunk for j (a gloo/NCCL reduce with BXOR). When one keeper is lost, each chunk k of its rank's shard is
P_k XOR the other ranks' chunks for k: rebuilt without disk, at 1/(world-1) of a shard of extra memory per keeper.
One world alone keeps no parity.

Restore (`checkpoint.resume`, same world size and layout): every rank lists what its keeper holds; the newest step
that every rank holds, or all but one with the parity to rebuild it, is used if it is newer than the newest disk
checkpoint. The state goes back through `TrainState.load_state_dict` exactly as a DCP load does (in place into this
process's tensors), so training continues bitwise as if it had not stopped.

A keeper keeps the two newest steps (a kill in the middle of a snapshot leaves the previous one whole everywhere),
exits when its rank says the run completed, and after `checkpoint.snapshot_keep_s` seconds with no trainer
connected. Keepers are found by an abstract Unix socket name derived from the run directory and the rank, and
accept only clients that know the run's key (`<run>/snapshot.key`, mode 0600).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

KEY_FILE = "snapshot.key"
TOKEN_ENV = "MLC_SNAPSHOT_TOKEN"
KEEP = 2  # steps a keeper holds per kind


def keeper_name(run_path: str | os.PathLike, rank: int) -> str:
    digest = hashlib.sha256(str(Path(run_path).resolve()).encode()).hexdigest()[:24]
    return f"mlc-snapshot-{digest}-rank{rank}"


def used_by(run_path: Path) -> bool:
    """Whether the run took in-memory snapshots (its key exists): it may be resumable without a disk checkpoint."""
    return (run_path / KEY_FILE).is_file()


# ---- wire format: an 8-byte length, a JSON header, an 8-byte length, the payload ---------------------------------
def _send(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(payload)))
    if len(payload):
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return buf


def _recv(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
    header = json.loads(bytes(_recv_exact(sock, n)))
    (m,) = struct.unpack("<Q", _recv_exact(sock, 8))
    return header, _recv_exact(sock, m)


# ---- the keeper process -------------------------------------------------------------------------------------------
class Keeper:
    def __init__(self, name: str, token: str, keep_s: float):
        self.name, self.token, self.keep_s = name, token, keep_s
        self.store: dict[tuple[str, int], tuple[dict[str, Any], bytearray]] = {}
        self.lock = threading.Lock()
        self.clients = 0
        self.idle_since = time.monotonic()
        self.finished = threading.Event()

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("\0" + self.name)  # fails if a keeper of this name already runs: this one then exits
        listener.listen(8)
        listener.settimeout(0.5)
        while not self.finished.is_set():
            with self.lock:
                idle = self.clients == 0 and time.monotonic() - self.idle_since > self.keep_s
            if idle:
                break
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            with self.lock:
                self.clients += 1
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        listener.close()

    def _client(self, conn: socket.socket) -> None:
        try:
            header, _ = _recv(conn)
            if not hmac.compare_digest(str(header.get("token", "")), self.token):
                return
            _send(conn, {"ok": True, "pid": os.getpid()})
            while True:
                header, payload = _recv(conn)
                _send(conn, *self._handle(header, payload))
                if header["op"] == "done":
                    self.finished.set()
                    return
        except (ConnectionError, OSError, ValueError):
            return
        finally:
            conn.close()
            with self.lock:
                self.clients -= 1
                self.idle_since = time.monotonic()

    def _handle(self, header: dict[str, Any], payload: bytearray) -> tuple[dict[str, Any], bytes | bytearray]:
        op = header["op"]
        with self.lock:
            if op == "put":
                kind, step = header["kind"], int(header["step"])
                self.store[(kind, step)] = (header["meta"], payload)
                for old in sorted(s for k, s in self.store if k == kind)[:-KEEP]:
                    del self.store[(kind, old)]
                return {"ok": True}, b""
            if op == "list":
                listing: dict[str, dict[str, Any]] = {}
                for (kind, step), (meta, _) in self.store.items():
                    listing.setdefault(kind, {})[str(step)] = meta
                return {"ok": True, "list": listing}, b""
            if op == "get":
                meta, data = self.store[(header["kind"], int(header["step"]))]
                return {"ok": True, "meta": meta}, data
            if op == "done":
                return {"ok": True}, b""
        return {"ok": False, "error": f"unknown op {op}"}, b""


class KeeperClient:
    """A connection to one keeper (started here, in its own session, if none answers)."""

    def __init__(self, name: str, token: str, keep_s: float, start: bool = True, wait_s: float = 60.0):
        self.name, self.token = name, token
        self.sock = self._connect()
        if self.sock is None and start:
            subprocess.Popen(
                [sys.executable, "-m", "mlc.distributed.snapshot", name, str(keep_s)],
                env={**os.environ, TOKEN_ENV: token}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
            )
            deadline = time.monotonic() + wait_s
            while self.sock is None and time.monotonic() < deadline:
                time.sleep(0.05)
                self.sock = self._connect()
        if self.sock is None:
            raise ConnectionError(f"no snapshot keeper answers at {name}")

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect("\0" + self.name)
            _send(sock, {"token": self.token})
            header, _ = _recv(sock)
        except (ConnectionError, OSError):
            sock.close()
            return None
        self.pid = int(header["pid"])
        return sock

    def call(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> tuple[dict[str, Any], bytearray]:
        _send(self.sock, header, payload)
        reply, data = _recv(self.sock)
        if not reply.get("ok"):
            raise ConnectionError(reply.get("error", "the snapshot keeper refused"))
        return reply, data

    def close(self, done: bool = False) -> None:
        if done:
            self.call({"op": "done"})
        self.sock.close()


def main(argv: list[str]) -> None:
    name, keep_s = argv[0], float(argv[1])
    try:
        Keeper(name, os.environ.pop(TOKEN_ENV), keep_s).serve()
    except OSError:  # the name is taken: another keeper serves this rank
        pass


# ---- the trainer's side (torch from here on) ----------------------------------------------------------------------
def run_token(run_path: Path, is_main: bool) -> str:
    """The run's key: created by rank 0 at the first use, the same on every rank."""
    from mlc.distributed import dist as mdist

    token = None
    if is_main:
        path = run_path / KEY_FILE
        if not path.is_file():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16))
        token = path.read_text().strip()
    return mdist.broadcast_object(token)


class Snapshots:
    def __init__(self, run_path: Path, rank: int, world: int, layout: str, keep_s: float, is_main: bool):
        """Connect this rank to its keeper (every rank calls this at the same point: the key is broadcast and the
        snapshot thread's process group created)."""
        import torch.distributed as dist

        self.rank, self.world, self.layout, self.keep_s = rank, world, layout, keep_s
        self.name, self.token = keeper_name(run_path, rank), run_token(run_path, is_main)
        self.keeper = KeeperClient(self.name, self.token, keep_s)
        # The parity collectives run in the snapshot thread while the training thread uses the default group: a
        # group of their own (gloo: host tensors), as the asynchronous checkpoint writer does.
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mlc-snapshot")
        self.pending: Future | None = None

    # ---- saving ---------------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, trainer: dict[str, Any]) -> None:
        """Copy this rank's shard of step `step` to host memory now; serialise it, exchange the parity and hand both
        to the keeper in the background (every rank). The previous snapshot is finished first."""
        from mlc.distributed.checkpoint import rng_state

        self.wait()
        taken = {"state": _local_tree(state.state_dict()), "rng": rng_state(), "trainer": {**trainer, "step": step, "world_size": self.world}}
        self.pending = self.pool.submit(self._store, step, taken)

    def wait(self) -> None:
        """Finish the snapshot in flight, if any (raises what it raised)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _store(self, step: int, taken: dict[str, Any]) -> None:
        import torch

        from mlc.distributed import faults

        buf = io.BytesIO()
        torch.save(taken, buf)
        blob = buf.getbuffer()
        lengths = self._lengths(len(blob))
        meta = {"world": self.world, "layout": self.layout, "lengths": lengths}
        parity = None
        if self.world > 1:
            import torch.distributed as dist

            padded = _padded(blob, max(lengths), self.world)
            c = padded.numel() // (self.world - 1)
            for j in range(self.world):
                part = torch.zeros(c, dtype=torch.uint8) if j == self.rank else _chunk(padded, self.rank, j, c).clone()
                dist.reduce(part, dst=j, op=dist.ReduceOp.BXOR, group=self.group)
                if j == self.rank:
                    parity = part
        self._put({"op": "put", "kind": "shard", "step": step, "meta": meta}, blob)
        if parity is not None:
            self._put({"op": "put", "kind": "parity", "step": step, "meta": meta}, parity.numpy().data)
        faults.maybe_kill("after-snapshot", step)

    def _put(self, header: dict[str, Any], payload: Any) -> None:
        """Hand bytes to the keeper; one that died meanwhile is replaced (its older snapshots are then the peers'
        parity's to rebuild)."""
        try:
            self.keeper.call(header, payload)
        except (ConnectionError, OSError):
            self.keeper = KeeperClient(self.name, self.token, self.keep_s)
            self.keeper.call(header, payload)

    def _lengths(self, n: int) -> list[int]:
        import torch
        import torch.distributed as dist

        counts = torch.zeros(self.world, dtype=torch.int64)
        counts[self.rank] = n
        if self.group is not None:
            dist.all_reduce(counts, group=self.group)
        return [int(x) for x in counts.tolist()]

    # ---- restoring ------------------------------------------------------------------------------------------------
    def restore(self, state: Any, newer_than: int) -> dict[str, Any] | None:
        """Load the newest snapshot newer than step `newer_than` into `state` (every rank); its trainer record (with
        `rebuilt_rank` when one rank's shard came from parity), or None when no usable snapshot is that new."""
        import torch
        import torch.distributed as dist

        listing = self.keeper.call({"op": "list"})[0]["list"]
        listings = _all_gather(listing, self.world)
        step, missing = _choose(listings, newer_than, self.world, self.layout)
        if step is None:
            return None
        blob: Any = None
        if missing != self.rank:
            blob = self.keeper.call({"op": "get", "kind": "shard", "step": step})[1]
        if missing is not None:
            lengths = next(m for m in (lst.get("shard", {}).get(str(step)) for lst in listings) if m)["lengths"]
            padded = _padded(blob, max(lengths), self.world) if blob is not None else None
            c = -(-max(lengths) // (self.world - 1))
            chunks = []
            for k in (j for j in range(self.world) if j != missing):
                if self.rank == missing:
                    part = torch.zeros(c, dtype=torch.uint8)
                elif self.rank == k:
                    part = torch.frombuffer(self.keeper.call({"op": "get", "kind": "parity", "step": step})[1], dtype=torch.uint8).clone()
                else:
                    part = _chunk(padded, self.rank, k, c).clone()
                dist.reduce(part, dst=missing, op=dist.ReduceOp.BXOR, group=self.group)
                chunks.append(part)
            if self.rank == missing:
                blob = torch.cat(chunks)[: lengths[missing]].numpy().tobytes()
        trainer = _deserialise(state, blob)
        trainer["rebuilt_rank"] = missing
        return trainer

    def close(self, run_completed: bool) -> None:
        """Finish the snapshot in flight and disconnect; when the run completed, the keeper exits (else it waits for
        a trainer, up to keep_s)."""
        self.wait()
        self.pool.shutdown(wait=True)
        self.keeper.close(done=run_completed)


def _all_gather(obj: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _choose(listings: list[dict[str, Any]], newer_than: int, world: int, layout: str) -> tuple[int | None, int | None]:
    """(step, the rank whose shard must be rebuilt or None) of the newest usable snapshot, or (None, None)."""
    steps = sorted({int(s) for lst in listings for s in lst.get("shard", {})}, reverse=True)
    for step in steps:
        if step <= newer_than:
            break
        metas = [lst.get("shard", {}).get(str(step)) for lst in listings]
        meta = next(m for m in metas if m)
        if meta["world"] != world or meta["layout"] != layout:
            continue
        missing = [r for r, m in enumerate(metas) if m is None]
        if not missing:
            return step, None
        (m,) = missing if len(missing) == 1 else (None,)
        if m is not None and world > 1 and all(str(step) in listings[k].get("parity", {}) for k in range(world) if k != m):
            return step, m
    return None, None


def _padded(blob: bytes | bytearray, longest: int, world: int):
    """The bytes as uint8, zero-padded to world-1 equal chunks of the longest shard."""
    import torch

    c = -(-longest // (world - 1))
    out = torch.zeros(c * (world - 1), dtype=torch.uint8)
    out[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return out


def _chunk(padded, rank: int, peer: int, c: int):
    """Rank `rank`'s chunk destined for peer `peer`: chunks go to the other ranks in ascending order."""
    i = peer if peer < rank else peer - 1
    return padded[i * c : (i + 1) * c]


def _deserialise(state: Any, blob: bytes | bytearray) -> dict[str, Any]:
    import torch

    from mlc.distributed.checkpoint import set_rng_state

    saved = torch.load(io.BytesIO(blob), weights_only=False)
    state.load_state_dict(_fill(state.state_dict(), saved["state"]))
    set_rng_state(saved["rng"])
    return {**saved["trainer"], "rng_restored": True}


def _local_tree(tree: Any) -> Any:
    """The state dict with each tensor as this process holds it (a DTensor's local shard), copied to the CPU."""
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.to_local().detach().cpu().clone()
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _local_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_local_tree(v) for v in tree)
    return tree


def _fill(current: Any, saved: Any) -> Any:
    """The saved values in this process's state dict, copied into its own tensors in place (as a DCP load does)."""
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(current, DTensor):
        current.to_local().copy_(saved)
        return current
    if isinstance(current, torch.Tensor):
        current.copy_(saved)
        return current
    if isinstance(current, dict) and isinstance(saved, dict):
        return {k: _fill(current[k], v) if k in current else v for k, v in saved.items()}
    if isinstance(current, (list, tuple)) and isinstance(saved, (list, tuple)) and len(current) == len(saved):
        return type(saved)(_fill(c, s) for c, s in zip(current, saved))
    return saved


if __name__ == "__main__":
    main(sys.argv[1:])
