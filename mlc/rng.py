"""Keyed random streams: a torch.Generator whose draws depend only on (seed, key), never on the order of work.

A merge or an upcycle processes tensors in any order (and in parallel), yet gives the same bits for the
same seed: each tensor (or expert, layer, ...) draws from its own generator keyed by its name.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def keyed_generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, *key): keyed_generator(7, "model.norm.weight")."""
    import torch

    digest = hashlib.blake2b(":".join(map(str, (seed, *key))).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
