"""GGML's k-quants Q4_K and Q6_K, quantised from float weights with torch (every block at once), and llama.cpp's Q4_K_M mix.

The layouts are GGUF's (what llama.cpp and gguf-py's dequantisers read), per super-block of 256 weights:
- Q4_K, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc[8] and mins m[8] (bytes 0-3: sc[0:4] with the
  top 2 bits of sc[4:8] above them; 4-7: m[0:4] likewise with m[4:8]; 8-11: low nibbles of sc[4:8] | m[4:8] << 4),
  128 bytes of 4-bit q (byte 32c + l holds weight 64c + l low, 64c + 32 + l high). w = d*sc[j] * q - dmin*m[j]
  for the 8 sub-blocks j of 32.
- Q6_K, 210 bytes: 128 bytes of the low 4 bits (ql), 64 of the high 2 (qh), 16 int8 scales, fp16 d;
  w = d*sc[j] * (q - 32) for the 16 sub-blocks j of 16.
The search follows ggml's reference quantisers (what llama-quantize runs without an importance matrix): for
Q4_K, per sub-block a weighted least-squares fit of scale and min over 21 candidate grids (weights
rms(x) + |x|), then the scales and mins rounded to 6 bits against the block's largest; for Q6_K, per sub-block
the x^2-weighted best of 19 grids around the signed absmax, then the scales rounded to int8. Sums run in a
different order than ggml's sequential loops, so a near-tie can pick the other candidate: the blocks are
ggml's in kind, not guaranteed byte for byte (tests/quantize/test_kquants.py measures how close).
"""

from __future__ import annotations

import torch

QK_K = 256
Q4_K_BYTES, Q6_K_BYTES = 144, 210
CHUNK_BLOCKS = 1024  # super-blocks per step: temporaries of 1 MB, which stay in cache (8192 ran 1.7x slower)


def _rnd(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even, as float + 1.5 * 2^23 does."""
    return torch.round(x)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _fit_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                   nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min >= 0) per row of x [S, n] with x ~ scale * L - min, L in [0, nmax], minimising the w-weighted error.

    ggml's make_qkx2_quants: start from the grid spanning [min(x, 0), max(x)], then try nstep + 1 grids of
    (nmax + rmin + rdelta * i) steps over the same range, each refitted by least squares, keeping the best; each
    try starts from the best offset so far.
    """
    lo = x.amin(1).clamp(max=0.0)
    hi = x.amax(1)
    sum_w = w.sum(1)
    sum_x = (w * x).sum(1)
    span = hi - lo
    flat = span == 0
    span = torch.where(flat, torch.ones_like(span), span)
    iscale = nmax / span
    scale = 1.0 / iscale
    L = _rnd(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
    best = (w * (scale[:, None] * L + lo[:, None] - x).square()).sum(1)
    low = lo.clone()
    for i in range(nstep + 1):
        step = torch.tensor(rmin, dtype=torch.float32) + torch.tensor(rdelta, dtype=torch.float32) * i + nmax
        iscale = step / (hi - low)
        L = _rnd(iscale[:, None] * (x - low[:, None])).clamp(0, nmax)
        wl = w * L
        sum_l, sum_l2, sum_xl = wl.sum(1), (wl * L).sum(1), (wl * x).sum(1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = (w * (this_scale[:, None] * L + this_min[:, None] - x).square()).sum(1)
        better = (D > 0) & (err < best) & ~flat
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -low


def _q4_k_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q4_K bytes [B, 144], reconstruction [B, 256]) of B super-blocks x [B, 256] (float32)."""
    B = x.shape[0]
    sub = x.reshape(B * 8, 32)
    av = (sub.square().sum(1) / 32).sqrt()
    scales, mins = _fit_scale_min(sub, av[:, None] + sub.abs())
    scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
    max_scale = scales.amax(1).clamp(min=0.0)
    max_min = mins.amax(1).clamp(min=0.0)
    inv_scale = torch.where(max_scale > 0, 63.0 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / max_min, torch.zeros_like(max_min))
    ls = _rnd(inv_scale[:, None] * scales).clamp(0, 63).to(torch.uint8)
    lm = _rnd(inv_min[:, None] * mins).clamp(0, 63).to(torch.uint8)
    d = (max_scale / 63).to(torch.float16)
    dmin = (max_min / 63).to(torch.float16)
    dsub = d.float()[:, None] * ls.float()  # [B, 8], as the dequantiser forms them
    msub = dmin.float()[:, None] * lm.float()
    safe = torch.where(dsub == 0, torch.ones_like(dsub), dsub)
    q = _rnd((x.reshape(B, 8, 32) + msub[..., None]) / safe[..., None]).clamp(0, 15)
    q = torch.where(dsub[..., None] == 0, torch.zeros_like(q), q).to(torch.uint8)
    recon = (dsub[..., None] * q.float() - msub[..., None]).reshape(B, QK_K)  # q.float(): no -0.0 from rounding
    packed = torch.cat([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
    ], dim=1)
    qu = q.reshape(B, 4, 2, 32)
    qs = (qu[:, :, 0] | (qu[:, :, 1] << 4)).reshape(B, 128)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), packed, qs], dim=1), recon


def _fit_symmetric(x: torch.Tensor, nmax: int = 32) -> torch.Tensor:
    """The signed scale per row of x [S, n] for L in [-nmax, nmax - 1]: ggml's make_qx_quants with x^2 weights.

    The grid puts the largest |x| at -nmax (its sign carried by the scale); 18 more grids of -(nmax + 0.1 i)
    steps are tried and the one with the largest (sum w x L)^2 / sum w L^2 kept, its least-squares scale returned.
    """
    idx = x.abs().argmax(1, keepdim=True)  # the first of equal maxima, as ggml's strict > scan
    mx = x.gather(1, idx).squeeze(1)
    tiny = mx.abs() < 1e-15
    mx = torch.where(tiny, torch.ones_like(mx), mx)
    w = x * x

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = _rnd(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return (w * x * L).sum(1), (w * L * L).sum(1)  # ggml's product order: (w*x)*l, (w*l)*l

    sumlx, suml2 = sums(-nmax / mx)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    tenth = torch.tensor(0.1, dtype=torch.float32)
    for i in (*range(-9, 0), *range(1, 10)):
        slx, sl2 = sums(-(nmax + tenth * i) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    return torch.where(tiny, torch.zeros_like(scale), scale)


def _q6_k_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q6_K bytes [B, 210], reconstruction [B, 256]) of B super-blocks x [B, 256] (float32)."""
    B = x.shape[0]
    scales = _fit_symmetric(x.reshape(B * 16, 16)).reshape(B, 16)
    idx = scales.abs().argmax(1, keepdim=True)
    max_scale = scales.gather(1, idx).squeeze(1)
    zero = max_scale.abs() < 1e-15
    iscale = -128.0 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = torch.where(zero, torch.zeros_like(iscale), 1.0 / iscale).to(torch.float16)
    sc = _rnd(iscale[:, None] * scales).clamp(-128, 127)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc).to(torch.int8)
    dsub = d.float()[:, None] * sc.float()
    safe = torch.where(dsub == 0, torch.ones_like(dsub), dsub)
    q = _rnd(x.reshape(B, 16, 16) / safe[..., None]).clamp(-32, 31)
    q = torch.where(dsub[..., None] == 0, torch.zeros_like(q), q).to(torch.int8)
    recon = (dsub[..., None] * q.float()).reshape(B, QK_K)
    L = (q + 32).to(torch.uint8).reshape(B, 2, 4, 32)  # two halves of 128, each four runs of 32
    ql = torch.cat([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], dim=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = torch.cat([ql.reshape(B, 128), qh.reshape(B, 64), sc.view(torch.uint8), _fp16_bytes(d)], dim=1)
    return out, recon


KINDS = {"Q4_K": (_q4_k_blocks, Q4_K_BYTES), "Q6_K": (_q6_k_blocks, Q6_K_BYTES)}


def quantize_k(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGML blocks as bytes [rows, cols / 256 * block bytes] uint8, the weights they hold [rows, cols] float32).

    weight is 2-D with a multiple of 256 columns; kind is "Q4_K" or "Q6_K". The reconstruction is computed
    exactly as a dequantiser does (d * sc in float32, times q, minus dmin * m), so it equals gguf-py's bit for bit.
    """
    fn, nbytes = KINDS[kind]
    rows, cols = weight.shape
    if cols % QK_K:
        raise ValueError(f"{kind} needs a multiple of {QK_K} columns, not {cols}")
    x = weight.detach().to(torch.float32).reshape(-1, QK_K)
    blocks = torch.empty(x.shape[0], nbytes, dtype=torch.uint8)
    recon = torch.empty_like(x)
    # One thread: the many small elementwise ops gain little from a second one, and on a CPU shared with other
    # jobs OpenMP's barriers made them 4x slower in wall time (43 s against 10 s of CPU for a 2M-weight model).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for s in range(0, x.shape[0], CHUNK_BLOCKS):
            blocks[s:s + CHUNK_BLOCKS], recon[s:s + CHUNK_BLOCKS] = fn(x[s:s + CHUNK_BLOCKS])
    finally:
        torch.set_num_threads(threads)
    return blocks.reshape(rows, -1), recon.reshape(rows, cols)


# ---- llama.cpp's Q4_K_M mix ------------------------------------------------------------------------------
def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(kind: str, cols: int) -> str:
    """llama.cpp's type for rows that are not whole 256-wide super-blocks (Q4_K -> Q5_0, Q6_K -> Q8_0, F16 if not 32-wide)."""
    if kind in ("Q4_K", "Q6_K") and cols % QK_K:
        kind = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[kind]
    if kind in ("Q5_0", "Q8_0") and cols % 32:
        kind = "F16"
    return kind


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layers: int, has_output: bool) -> str | None:
    """The GGML type llama-quantize gives GGUF tensor `name` in a Q4_K_M file of a dense model; None: not quantised (F32).

    The rule, read from llama.cpp's llama-quant.cpp (llama_tensor_get_type with ftype Q4_K_M, no imatrix, no
    overrides), for the tensors of a llama/qwen2 model:
    - 1-D tensors and norms stay as they are (F32 here).
    - output.weight, and token_embd.weight when the model has no output.weight (tied): Q6_K, or Q8_0 when its
      rows are not a multiple of 256.
    - attn_v.weight of layer i and ffn_down.weight of layer i: Q6_K when use_more_bits(i, n_layers)
      (i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2), else Q4_K.
    - everything else 2-D (attn_q/k/output, ffn_gate/up, an untied token_embd): Q4_K.
    - then the shape fallback: a Q4_K tensor whose rows are not whole super-blocks becomes Q5_0, a Q6_K one Q8_0
      (F16 if the rows are not even 32-wide).
    """
    if len(shape) < 2 or not name.endswith(".weight") or "_norm." in name:
        return None
    cols = shape[-1]
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        return "Q8_0" if cols % QK_K else "Q6_K"
    kind = "Q4_K"
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(int(name.split(".")[1]), n_layers):
        kind = "Q6_K"
    return _fallback(kind, cols)
