"""LLM.int8() (2208.07339): vector-wise int8 with the outlier input features kept in 16-bit.

An input feature is an outlier when any calibration activation reaching the layer has magnitude at
least the threshold (6.0 in the paper). The weight's columns for those features stay in fp16; the
other columns are quantised to int8 per output row (absmax / 127). At run time the activations'
ordinary features are quantised per token, multiplied in int8 and rescaled.

Activation rows are quantised with a zero point, the paper's "zeropoint vector-wise + decomposition"
(its Table 1: the best int8 variant at 125M parameters, 25.69 against fp32's 25.65, where absmax gave
25.83). On SmolLM2-135M the zero point takes LLM.int8's perplexity increase from +0.86% to about 0%
(benchmarks/RESULTS.md): the inputs of q/k/v are skewed per token, and absmax wastes half the range.
"""

from __future__ import annotations

import torch

from mlc.kernels.quant_weights import OutlierInt8Weight

THRESHOLD = 6.0


def quantize_llm_int8(w: torch.Tensor, input_absmax: torch.Tensor, threshold: float = THRESHOLD) -> OutlierInt8Weight:
    """Split w [N, K] by the features whose calibration |x| reached the threshold, and quantise the rest."""
    w = w.float()
    cols = torch.nonzero(input_absmax >= threshold).flatten()
    ordinary = w.index_fill(1, cols, 0.0)
    scale = ordinary.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(ordinary / scale).clamp(-127, 127).to(torch.int8)
    return OutlierInt8Weight(q, scale, cols, w[:, cols].to(torch.float16), activation_zero_point=True)
