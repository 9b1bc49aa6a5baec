"""Whole-tensor sums computed as a default torch process computes them, so float results match mergekit's.

torch splits a reduction to one number (a norm, a sum of |delta|) into one chunk per thread and adds
the chunks' sums, so the last bits of the result depend on the thread count. mergekit runs with torch's
default count; mlc's merge workers run single-threaded (see executor.py), so the few reductions whose
bits reach the output (rescaling, norms, cosines) run inside `default_threads()`. The setting is per
thread (OpenMP's), so other workers keep theirs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

DEFAULT = torch.get_num_threads()  # read at import, before a merge changes it


@contextmanager
def default_threads() -> Iterator[None]:
    """Run the body with torch's default intra-op thread count in this thread."""
    current = torch.get_num_threads()
    if current == DEFAULT:
        yield
        return
    torch.set_num_threads(DEFAULT)
    try:
        yield
    finally:
        torch.set_num_threads(current)
