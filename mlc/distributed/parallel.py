"""Parallelism for a model whose blocks are known: DDP, FSDP2 (`fully_shard` on each block, then the root), or
tensor parallelism (DTensor) within groups of processes, with FSDP2 across the groups (2-D).

The returned module has the same forward; `sync_gradients(model, flag)` switches gradient reduction off for the
micro-batches of an accumulation that are not the last.
"""

from __future__ import annotations

import logging
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


# Megatron's split of a decoder block (torchtitan's plan without sequence parallelism): q/k/v and gate/up are cut by
# output features (each process computes whole heads and a slice of the MLP's width, with no communication), o and
# down by input features, whose partial outputs are summed by one all-reduce. Each process's attention sees only its
# own heads: the native Attention takes the head count from its projections' outputs. Embeddings, norms and the head
# stay whole on every process (replicated), so the logits and the loss are the one-process ones.
TP_PLAN = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise", "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}


def tensor_parallel(model: nn.Module, blocks: list[nn.Module], tp_size: int, device: torch.device) -> nn.Module:
    """Split each block over groups of tp_size consecutive processes; FSDP2 shards across the groups when there
    are several (a 2-D ("dp", "tp") mesh). Processes of one group must be fed the same batches."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if tp_size == 1:
        return wrap(model, blocks, "fsdp", device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

    groups = dist.get_world_size() // tp_size
    mesh = init_device_mesh(device.type, (groups, tp_size), mesh_dim_names=("dp", "tp"))
    whole = Replicate()
    for block in blocks:
        plan = {name: ColwiseParallel() if how == "colwise" else RowwiseParallel() for name, how in TP_PLAN.items()}
        # The attention's and the MLP's input as one replicated DTensor shared by q/k/v (gate/up): the backward then
        # sums their input gradients locally and all-reduces once, not once per projection. Attention(x, cos, sin,
        # cache): only x is distributed.
        plan["self_attn"] = PrepareModuleInput(input_layouts=(whole, None, None, None), desired_input_layouts=(whole, None, None, None), use_local_output=False)
        plan["mlp"] = PrepareModuleInput(input_layouts=(whole,), desired_input_layouts=(whole,), use_local_output=False)
        parallelize_module(block, mesh["tp"], plan)
    if groups > 1:
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        # Gathering a 2-D sharded weight whole (the export) takes two all-gathers, which torch logs as suboptimal on
        # every rank; it happens once per run.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        for block in blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
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
    if len({mesh_key(p) for p in params}) > 1:  # tensor parallelism: plain and DTensor grads, or several meshes
        return _clip_mixed(params, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


def mesh_key(t: torch.Tensor) -> tuple | None:
    """Which device mesh a DTensor lives on (None for a plain tensor): torch's foreach ops take one kind at a time."""
    mesh = getattr(t, "device_mesh", None)
    return None if mesh is None else (mesh.mesh_dim_names, tuple(mesh.mesh.flatten().tolist()))


@torch.no_grad()
def _clip_mixed(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for gradients that torch's cannot stack together (plain tensors next to DTensors, DTensors on
    a 2-D mesh next to FSDP's 1-D ones). Each process sums the squares of the elements it holds, counting a copy only
    once: a replicated dimension counts on its first process, a plain tensor (whole everywhere) on rank 0, a DTensor
    on a sub-mesh on the copy of it that holds rank 0. One all-reduce gives the global sum."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    rank = dist.get_rank()
    squares, local = [], []
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
                p.grad = g
            mesh = g.device_mesh
            counts = 0 in mesh.mesh and all(mesh.get_local_rank(d) == 0 for d, pl in enumerate(g.placements) if pl.is_replicate())
            g = g.to_local()
        else:
            counts = rank == 0
        local.append(g)
        if counts:
            squares.append(torch.linalg.vector_norm(g, dtype=torch.float32) ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=local[0].device)
    dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].dtype))
    return norm
