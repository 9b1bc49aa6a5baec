"""The causal (optionally sliding-window) attention mask, shared by the contiguous and the paged KV cache."""

from __future__ import annotations

import torch


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (q, k) mask: True where a query may attend a key (key j is visible to query i when i - window < j <= i)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed
