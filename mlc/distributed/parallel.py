"""Data parallelism for a model whose blocks are known: DDP, or FSDP2 (`fully_shard` on each block, then the root).

The returned module has the same forward; `sync_gradients(model, flag)` switches gradient reduction off for the
micro-batches of an accumulation that are not the last.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn


def wrap(
    model: nn.Module,
    blocks: list[nn.Module],
    how: Literal["ddp", "fsdp"],
    device: torch.device,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Wrap `model` for the current process group (a lone process gets it back unchanged)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns that the model returns a view (the logits); nothing modifies them in place, so the warning is noise.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Gradients are reduced in fp32 even when the compute dtype is bf16: summing many bf16 shards loses bits.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def sync_gradients(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients on the next backward (True) or only accumulate them locally (False)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm over every process's shard (clipped to max_norm when max_norm > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm
