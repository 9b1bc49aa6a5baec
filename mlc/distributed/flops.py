"""Peak dense bf16 FLOP/s of known accelerators, for MFU (model FLOPs utilisation = achieved / peak)."""

from __future__ import annotations

import torch

# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendors' data sheets, per device.
# Ordered so that the more specific name matches first ("H100 PCIe" before "H100").
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM
    ("H800", 989.4e12),
    ("GH200", 989.4e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("L40S", 362.05e12),
    ("L4", 121.0e12),
    ("A10", 125.0e12),
    ("RTX 4090", 165.2e12),
    ("MI300X", 1307.4e12),
    ("MI250X", 383.0e12),
]


def peak_flops_for(name: str) -> float | None:
    """The table's peak for a device name (as torch.cuda.get_device_name gives it), or None if unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def device_peak_flops(device: torch.device, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: `override` when given, else the table for a GPU; None on CPU (give --peak-flops)."""
    if override > 0:
        return override
    if device.type == "cuda":
        return peak_flops_for(torch.cuda.get_device_name(device))
    return None
