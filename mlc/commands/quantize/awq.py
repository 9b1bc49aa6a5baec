"""AWQ (Lin et al. 2023, 2306.00978): activation-aware scaling of each Linear's input channels before round-to-nearest.

A few input channels carry large activations; scaling their weight columns up by s (and the activations
down by 1/s, folded into the RMSNorm or Linear that feeds them) gives those columns more of the integer
grid. Per group of Linears that share an input, the scales are searched on a grid as in AutoAWQ
(duo scaling): s = mean|x|^a / mean(|w| / max|w|)^(1 - a), normalised to a geometric middle of 1, for
a = 0, 1/20, ..., 19/20 (a = 0 with duo scaling still reweights by the weights; the grid always holds
the plain RTN result too, s = 1, so AWQ never ends worse than RTN on its objective).

The objective is each Linear's output error over all calibration tokens, sum_rows d H d^T with
d = W - Q(W s) / s and H = X^T X / tokens: exact for the Linears' outputs and costs N K^2 per grid point
instead of tokens x N x K. (AutoAWQ measures the whole attention or MLP output on a sample of tokens;
this measures the Linears feeding them, on every token.) No weight clipping search.

Groups in a decoder block (dense Llama/Mistral/Qwen2 blocks):
- input_layernorm -> q_proj, k_proj, v_proj (the norm's weight takes 1/s);
- v_proj -> o_proj, only without grouped-query attention (v_proj's rows take 1/s);
- post_attention_layernorm -> gate_proj, up_proj;
- up_proj -> down_proj (up_proj's rows take 1/s).
The output is plain int4 (or int8) in the compressed-tensors layout, with the changed norm weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mlc.commands.quantize.rtn import quantize_int

GRID = 20
GROUPS = (  # (the op whose output feeds the Linears, the Linears)
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def _output_error(w: torch.Tensor, scaled_q: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> float:
    d = w - scaled_q / s
    return float(((d @ h) * d).sum())


def search_scales(weights: list[torch.Tensor], hessians: list[torch.Tensor], act_mean: torch.Tensor,
                  quantize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """(scales s [K], best ratio a, error reduction vs s = 1) for Linears sharing one input.

    quantize(w) returns the dequantised quantisation of w (the scheme's grid).
    """
    group_w = torch.cat(weights)
    w_mean = (group_w.abs() / group_w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).mean(0)

    def error(s: torch.Tensor) -> float:
        return sum(_output_error(w, quantize(w * s), s, h) for w, h in zip(weights, hessians))

    ones = torch.ones_like(act_mean)
    best_s, best_a, best = ones, None, error(ones)
    plain = best
    for i in range(GRID):
        a = i / GRID
        s = (act_mean.clamp_min(1e-8).pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        e = error(s)
        if e < best:
            best_s, best_a, best = s, a, e
    return best_s, (best_a if best_a is not None else -1.0), (best / plain if plain > 0 else 1.0)


def smooth_block(prefix: str, read: Callable[[str], torch.Tensor], present: Callable[[str], bool], stats: dict[str, Any],
                 linears: set[str], bits: int, group_size: int | None, symmetric: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The block's changed tensors by full name (fp32: scaled Linear weights, norms and feeding Linears), and what was chosen.

    read(name) gives a tensor of the checkpoint in fp32, present(name) whether it has one; stats[full Linear
    name] = (H, mean |x|); linears are the block's Linears being quantised (an excluded Linear is neither scaled
    nor folded into).
    """
    def quantize(w: torch.Tensor) -> torch.Tensor:
        return quantize_int(w, bits, group_size, symmetric).dequantize()

    changed: dict[str, torch.Tensor] = {}
    chosen: dict[str, Any] = {}

    def current(name: str) -> torch.Tensor:
        return changed[name] if name in changed else read(name)

    for source, targets in GROUPS:
        names = [f"{prefix}{t}" for t in targets]
        if not all(n in linears for n in names):
            continue  # a Linear left out (excluded, or a different block) keeps the group unscaled
        source_weight = current(f"{prefix}{source}.weight")
        weights = [current(f"{n}.weight") for n in names]
        if source.endswith("_proj") and (f"{prefix}{source}" not in linears or source_weight.shape[0] != weights[0].shape[1]):
            continue  # v_proj -> o_proj only when v's outputs are o's inputs one to one (no grouped-query attention)
        hessians = [stats[n][0] for n in names]
        act_mean = stats[names[0]][1]
        s, ratio, gain = search_scales(weights, hessians, act_mean, quantize)
        for n, w in zip(names, weights):
            changed[f"{n}.weight"] = w * s
        if source.endswith("_proj"):
            changed[f"{prefix}{source}.weight"] = source_weight / s.unsqueeze(1)  # the feeding Linear's output rows
            if present(f"{prefix}{source}.bias"):
                changed[f"{prefix}{source}.bias"] = current(f"{prefix}{source}.bias") / s
        else:
            changed[f"{prefix}{source}.weight"] = source_weight / s  # the RMSNorm's weight
        chosen[f"{prefix}{source}"] = {"ratio": ratio, "error_vs_rtn": round(gain, 4)}
    return changed, chosen
