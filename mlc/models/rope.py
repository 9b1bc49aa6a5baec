"""Rotary position embeddings: inverse frequencies (with linear and llama3 scaling) and a cos/sin table."""

from __future__ import annotations

import math
from typing import Any

import torch

from mlc.models.config import ModelConfig


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """The RoPE inverse frequencies, computed exactly as transformers does so logits match bit for bit."""
    # Always on the CPU, even when the model is being built under torch.device("meta").
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        # Scaling positions by 1/factor is the same as scaling the frequencies.
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos/sin for every position up to max_position_embeddings, built once per device on first use.

    Precomputing turns RoPE into one gather per forward pass: nothing is recomputed per decode step.
    It is a plain attribute, not a buffer, so it never lands in a state dict and stays fp32 when the
    model is cast to bf16 (transformers also computes cos/sin in fp32 and casts them per call).
    """

    def __init__(self, config: ModelConfig):
        self.inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.length = config.max_position_embeddings
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) of shape (max_position_embeddings, head_dim) on device, in fp32."""
        if device not in self._tables:
            positions = torch.arange(self.length, dtype=torch.int64, device="cpu").float()
            freqs = positions[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: the sign lives in the table, which
            # saves three ops per rotation and gives bit-identical results.
            sin = emb.sin()
            half = sin.shape[-1] // 2
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            self._tables[device] = (emb.cos().to(device), signed_sin.to(device))
        return self._tables[device]

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of shape (batch, 1, seq, head_dim) for the given positions, in dtype."""
        cos, sin = self.table(position_ids.device)
        return cos[position_ids].unsqueeze(1).to(dtype), sin[position_ids].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by its positions' angles, in transformers' "rotate half"
    convention: x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin
