"""Ray Serve request router for the engine replicas: prefix-cache affinity, else the least loaded (see routing.py).

This module holds the router class alone because Ray Serve pickles the module of a custom router by
value (its globals are copied into the process that routes): shared state lives in routing.py, which
is imported by reference.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from mlc.commands.serve import routing


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router: the replica with the longest remembered prompt prefix, else the least loaded."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.owner: OrderedDict[bytes, str] = OrderedDict()  # prefix hash -> replica id it was routed to
        routing.ROUTERS.add(self)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        arg = pending_request.args[0] if pending_request is not None and pending_request.args else None
        target = getattr(arg, "target", None)
        if target is not None:
            return [[by_id[target]]] if target in by_id else []
        key = getattr(arg, "route_key", None)
        if key:
            for digest in reversed(routing.prefix_hashes(key)):
                rid = self.owner.get(digest)
                if rid in by_id and self._not_overloaded(by_id[rid], candidate_replicas):
                    return [[by_id[rid]], [r for r in candidate_replicas if r.replica_id.unique_id != rid]]
                if rid is not None:
                    break  # its longest match is elsewhere (gone or busy): shorter ones point at the same or staler places
        # One rank in random order: Ray probes their queue lengths and takes the shortest (the first on a tie,
        # so a fixed order would send a burst of simultaneous requests all to one replica).
        return [random.sample(candidate_replicas, len(candidate_replicas))]

    def _not_overloaded(self, replica: RunningReplica, candidates: list[RunningReplica]) -> bool:
        cache = self.replica_queue_len_cache
        lens = [n for r in candidates if (n := cache.get(r.replica_id)) is not None]
        mine = cache.get(replica.replica_id)
        return mine is None or not lens or mine - min(lens) < routing.IMBALANCE

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        arg = pending_request.args[0] if pending_request.args else None
        key = getattr(arg, "route_key", None)
        if not key or getattr(arg, "target", None) is not None:
            return
        for digest in routing.prefix_hashes(key):
            self.owner[digest] = replica_id.unique_id
            self.owner.move_to_end(digest)
        while len(self.owner) > routing.MAX_ENTRIES:
            self.owner.popitem(last=False)
