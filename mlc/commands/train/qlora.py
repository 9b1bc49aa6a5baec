"""QLoRA (2305.14314): the frozen base's linear layers held in 4-bit NormalFloat, LoRA adapters trained on top.

The base is quantised with the same code book quantiser and kernel layout as `mlc quantize --scheme nf4`
(mlc.kernels: blockwise absmax NF4, 64 weights per bf16 scale, two codes per byte). The forward dequantises a
block of rows at a time and multiplies in bf16 on CPU (the compute dtype the paper uses; the activations' own
dtype on an accelerator), so no dense copy of a layer outlives its matmul. The backward needs only the input's
gradient (the base is frozen): it dequantises the weight again rather than keeping the forward's dense copy, so
the activations saved for the backward hold no dense weights.

Every plain nn.Linear inside the decoder blocks is quantised, the LoRA targets' base layers included (peft keeps
them as `base_layer`); the embeddings, the output head and the norms stay in model.dtype, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from mlc.errors import InputError
from mlc.kernels.codebook import quantize_codebook
from mlc.kernels.quant_linear import DEQUANT_BLOCK, CodebookLinear

GROUP_SIZE = 64  # the paper's block size


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T for a frozen quantised W; the backward dequantises W again, block by block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Nf4Linear) -> torch.Tensor:  # torch's signature
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # torch's signature
        layer = ctx.layer
        n, k = layer.out_features, layer.in_features
        grad_x = torch.zeros(grad.shape[0], k, dtype=grad.dtype, device=grad.device)
        rows = max(1, DEQUANT_BLOCK // k)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            grad_x.addmm_(grad[:, r0:r1], layer._dequant_rows(r0, r1, grad.dtype))
        return grad_x.to(ctx.x_dtype), None


class Nf4Linear(CodebookLinear):
    """A frozen NF4 linear layer that gradients flow through to its input (and to LoRA adapters around it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = _DequantMatmul.apply(x2, self).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_base(block_list: list[nn.Module]) -> int:
    """Replace every frozen nn.Linear (mlc's Linear included) in the blocks by its NF4 version, in place; returns how
    many were replaced."""
    count = 0
    for block in block_list:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear) or child.weight.requires_grad:  # peft's adapters are trainable
                    continue
                if child.in_features % GROUP_SIZE:
                    raise InputError(
                        f"lora.base: nf4 quantises in blocks of {GROUP_SIZE} inputs, and {name} has {child.in_features}",
                        'set lora.base = "dense" for this model',
                    )
                with torch.no_grad():
                    weight = quantize_codebook(child.weight.detach(), "nf4", GROUP_SIZE)
                setattr(parent, name, Nf4Linear(weight, child.bias).to(child.weight.device))
                count += 1
    return count
