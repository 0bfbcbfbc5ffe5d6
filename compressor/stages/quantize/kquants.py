"""llama.cpp's K quantization types (Q4_K, Q5_K, Q6_K) encoded into ggml's block bytes, in torch.

The `gguf` package decodes every ggml type but encodes only the legacy ones (Q4_0, Q8_0, Q5_0, ...). These are
ports of ggml's reference encoders, `quantize_row_q{4,5,6}_K_ref` in ggml-quants.c: what llama-quantize runs
when it is given no importance matrix. A super-block is 256 weights of one row: Q4_K/Q5_K split it into 8
sub-blocks of 32 with a 6-bit scale and min each (searched by `make_qkx2_quants`), Q6_K into 16 sub-blocks of
16 with an 8-bit scale (`make_qx_quants`). They run in torch so that a large matrix uses every core, or the
GPU when the stage has one; rows are encoded in chunks to bound memory. Round-half-to-even (torch.round) is
ggml's `nearest_int`. Sums are pairwise rather than ggml's sequential float sums, so a rare rounding tie may
land differently; the layout is exactly ggml's (tests decode it with the gguf package)."""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
BYTES_PER_BLOCK = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
CHUNK_ELEMENTS = 1 << 22  # weights encoded at once: ~16 MB of float32, ~0.3 GB of temporaries
GROUP_MAX_EPS = 1e-15


def encode(weight: torch.Tensor, qtype: str) -> np.ndarray:
    """[rows, cols] float weights (cols a multiple of 256) -> [rows, cols / 256 * bytes per block] uint8."""
    rows, cols = weight.shape
    if cols % QK_K:
        raise ValueError(f"{qtype} needs a row length that is a multiple of {QK_K}, not {cols}")
    encoder = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[qtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a stage given a GPU encodes on it
    out = np.empty((rows, cols // QK_K * BYTES_PER_BLOCK[qtype]), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        blocks = weight[start : start + step].to(device).float().reshape(-1, QK_K)
        out[start : start + step] = encoder(blocks).cpu().numpy().reshape(-1, out.shape[1])
    return out


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[n] float32 -> [n, 2] uint8: ggml's fp16 fields (little endian, like every tensor in a GGUF)."""
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over the last dim of [..., n]: the scale and min of `scale * q - min` (q in
    0..nmax) that minimise the weighted squared error, trying nstep + 1 grid spacings over (max - min) / nmax.
    As in ggml, a better fit's min becomes the origin of the later tries' grids. Returns (scale, the_min) with
    the_min >= 0, the value subtracted."""
    hi = x.amax(-1)
    lo = x.amin(-1).clamp(max=0)
    flat = hi == lo
    wx = weights * x
    ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)  # sums over the last dim as matmuls: much faster
    sum_w, sum_x, sum_x2 = weights @ ones, wx @ ones, (wx * x) @ ones

    def sums(numerator: float, minimum):
        span = hi - minimum
        iscale = numerator / torch.where(span > 0, span, torch.ones_like(span))
        q = (x - minimum[..., None]).mul_(iscale[..., None]).round_().clamp_(0, nmax)
        wq = weights * q
        sum_l = wq @ ones
        sum_l2 = wq.mul_(q) @ ones
        return sum_l, sum_l2, q.mul_(wx) @ ones

    def error(scale, minimum, sum_l, sum_l2, sum_xl):
        # sum of w * (scale * q + min - x)^2, expanded into the sums above: one pass over the weights per try
        return (
            scale * scale * sum_l2
            + 2 * scale * minimum * sum_l
            - 2 * scale * sum_xl
            + minimum * minimum * sum_w
            - 2 * minimum * sum_x
            + sum_x2
        )

    best_scale, best_min = torch.where(flat, torch.ones_like(hi), hi - lo) / nmax, lo
    best_error = error(best_scale, best_min, *sums(nmax, lo))
    for step in range(nstep + 1):
        sum_l, sum_l2, sum_xl = sums(rmin + rdelta * step + nmax, best_min)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # a grid must reach zero: pin the min there and refit the scale alone
        this_scale = torch.where(
            positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale
        )
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        now = error(this_scale, this_min, sum_l, sum_l2, sum_xl)
        better = ok & (now < best_error)
        best_error = torch.where(better, now, best_error)
        best_scale = torch.where(better, this_scale, best_scale)
        best_min = torch.where(better, this_min, best_min)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_min = torch.where(flat, lo, best_min)
    return best_scale, -best_min


def _k_scales_mins(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared by Q4_K and Q5_K: 8 sub-blocks of 32 per super-block -> (d, dmin, 6-bit scales, 6-bit mins, q)."""
    sub = x.reshape(-1, 8, 32)
    av_x = torch.sqrt((sub * sub).sum(-1) / 32)
    scales, mins = _make_qkx2_quants(sub, av_x[..., None] + sub.abs(), nmax, rmin, 0.1, nstep)
    max_scale, max_min = scales.amax(-1), mins.amax(-1)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    ls = torch.round(inv_scale[:, None] * scales).clamp(max=63)
    lm = torch.round(inv_min[:, None] * mins).clamp(max=63)
    d16, dmin16 = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    d = d16.float()[:, None] * ls  # the scale and min each sub-block really gets, as the decoder computes them
    dm = dmin16.float()[:, None] * lm
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round((sub + dm[..., None]) / safe_d[..., None]).clamp(0, nmax)
    q = torch.where(d[..., None] == 0, torch.zeros_like(q), q)
    return d16, dmin16, ls.to(torch.uint8), lm.to(torch.uint8), q.to(torch.uint8)


def _pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and 8 six-bit mins -> ggml's 12 bytes (get_scale_min_k4 reads them back)."""
    low = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6)], dim=1)
    return torch.cat([low, (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, ls, lm, q = _k_scales_mins(x, 15, -1.0, 20)
    q = q.reshape(-1, 4, 2, 32)  # 64 weights per 32 bytes: the low nibble holds the first 32, the high the next
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(ls, lm), qs], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, ls, lm, q = _k_scales_mins(x, 31, -0.5, 15)
    low = q & 0xF
    high = (q >> 4).to(torch.int32)  # [n, 8, 32]: bit b of qh[j] is the fifth bit of sub-block b's weight j
    qh = (high << torch.arange(8, device=q.device, dtype=torch.int32)[None, :, None]).sum(1).to(torch.uint8)
    low = low.reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(ls, lm), qh, qs], dim=1)


def _make_qx_quants(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """ggml's make_qx_quants(rmse_type=1) over the last dim: the signed scale of q in -nmax..nmax-1 that best fits
    x under weights x^2, trying 19 grid spacings around the one that maps the largest |x| to -nmax."""
    idx = x.abs().argmax(-1, keepdim=True)
    peak = torch.gather(x, -1, idx).squeeze(-1)
    tiny = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(tiny, torch.ones_like(peak), peak)
    w = x * x
    wx = w * x
    ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)

    def fit(iscale):
        q = torch.mul(x, iscale[..., None]).round_().clamp_(-nmax, nmax - 1)
        sumlx = (wx * q) @ ones
        return sumlx, q.mul_(q).mul_(w) @ ones

    sumlx, suml2 = fit(-nmax / peak)
    scale = torch.where(
        suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2)
    )
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        safe = torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        scale = torch.where(better, sumlx / safe, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(tiny, torch.zeros_like(scale), scale)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    sub = x.reshape(-1, 16, 16)
    scales = _make_qx_quants(sub, 32)
    pick = scales.abs().argmax(-1, keepdim=True)
    max_scale = torch.gather(scales, -1, pick).squeeze(-1)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = torch.where(
        empty, torch.zeros_like(max_scale), -128 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    )
    d16 = torch.where(empty, torch.zeros_like(max_scale), 1 / torch.where(empty, torch.ones_like(iscale), iscale))
    d16 = d16.to(torch.float16)
    ls = torch.round(iscale[:, None] * scales).clamp(max=127).to(torch.int8)
    d = d16.float()[:, None] * ls.float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round(sub / safe[..., None]).clamp(-32, 31) + 32
    q = torch.where(d[..., None] == 0, torch.full_like(q, 32), q).to(torch.uint8).reshape(-1, 2, 4, 32)
    # Per half of 128 weights: ql[0:32] = w[0:32] | w[64:96] << 4, ql[32:64] = w[32:64] | w[96:128] << 4,
    # qh[0:32] = the top two bits of w[0:32], w[32:64], w[64:96], w[96:128] at bits 0, 2, 4, 6.
    low, high = q & 0xF, (q >> 4).to(torch.int32)
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2).reshape(-1, 128)
    shifts = torch.tensor([0, 2, 4, 6], device=q.device, dtype=torch.int32)[None, None, :, None]
    qh = (high << shifts).sum(2).to(torch.uint8).reshape(-1, 64)
    return torch.cat([ql, qh, ls.view(torch.uint8), _f16_bytes(d16)], dim=1)
