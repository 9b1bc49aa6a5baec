"""Which engine replica takes a request: the routing key, the prefix hashes, the live routers (router.py routes).

Each replica keeps its own prefix cache (KV blocks of prompts it has seen), so a prompt that shares a
long start with an earlier one is cheapest on the replica that served the earlier one. The router
hashes each prompt's text in 64-character steps (an incremental hash: one pass per prompt) and
remembers which replica each step's hash was last sent to (a bounded LRU table). A new request goes
to the replica holding its longest remembered step, unless that replica already has IMBALANCE more
requests in flight than the least busy one; without a match it goes to the least busy replica (Ray
probes the queue lengths of one rank and picks the shortest).

Why not Ray Serve LLM's PrefixCacheAffinityRouter: it keeps its prefix tree in a separate detached
actor (one more process and a remote call per request, on a machine that may have two cores), and
the table here is all the state this needs, in the process that routes.

The router lives in the process that holds the deployment handle (mlc serve's front), so that
process reads the live replica set from it (`live_replica_ids`) to address each replica in turn (its
/metrics, its pid and host): a request whose first argument has a `target` replica id goes there only.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field

CHUNK = 64  # characters per prefix step (about 16 tokens of English: one KV block)
MAX_ENTRIES = 200_000  # prefix steps remembered (about 25 MB)
IMBALANCE = 8  # requests in flight above the least busy replica beyond which affinity gives way to load


@dataclass
class Envelope:
    """One HTTP request as the front received it, for a replica's own API app; route_key is its prompt text."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    route_key: str | None = None
    target: str | None = None  # a replica id: this request must go there (the front's per-replica calls)


def route_key(path: str, body: bytes) -> str | None:
    """The prompt text of a generation request (completions' prompt, chat's messages), None for anything else."""
    if path not in ("/v1/completions", "/v1/chat/completions") or not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # the replica answers it with a 400
    if not isinstance(data, dict):
        return None
    prompt = data.get("messages") if path.endswith("chat/completions") else data.get("prompt")
    if prompt is None:
        return None
    return prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))


def prefix_hashes(text: str) -> list[bytes]:
    """The hash of each CHUNK-character prefix of text, shortest first."""
    h = hashlib.blake2b(digest_size=16)
    out = []
    for start in range(0, len(text) - CHUNK + 1, CHUNK):
        h.update(text[start:start + CHUNK].encode())
        out.append(h.copy().digest())
    return out


# The routers in this process (router.PrefixAffinityRouter registers itself here: Ray copies that module by value).
ROUTERS: weakref.WeakSet = weakref.WeakSet()


def live_replica_ids() -> list[str]:
    """Ids of the replicas the routers in this process currently route to."""
    return sorted({rid.unique_id for router in list(ROUTERS) for rid in router.curr_replicas})
