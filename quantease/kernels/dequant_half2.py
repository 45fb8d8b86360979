"""Dequantize the half2 words (Q = 8) to a dense weight: the large-M path when the planes are not kept.

prepare_weights keeps only the half2 words on CUDA where they are at Q = 8 (3-bit, per channel or groups of a
multiple of 256 columns): the GEMV and gemm_half2 read them for M <= gemm_half2.MAX_M, and above that (prefill)
ops.py writes the dense weight for the call with this kernel and hands it to cuBLAS, as gemm.dequantize does from
the planes.  Read as int16, role r of a 256-column block is 16 consecutive int16 lanes whose code slot j is the 16
consecutive columns 16 (5 r + j) .. + 15 of the block (the spare slot 15: bit r in bit 15 of role r's lanes;
kernels/gemm_half2.py has the layout), so each slot is one [BN, 16] tile: a shift and a mask per weight, then
s * (c - z) in fp32, rounded once to the output dtype (exactly gemm.dequantize's values).  The outliers are added
onto the block just written (gemm.add_span_outliers: L2 hits, N x R adds).
"""
import torch
import triton
import triton.language as tl

from quantease.errors import QuantEaseError
from quantease.kernels.gemm import add_span_outliers
from quantease.kernels.gemm_half2 import block_code
from quantease.kernels.prepare import has_q8_words

# (BN rows, num_warps) per program; one 256-column block per program.  H200, session 7 (kernels.py --parts, M = 256
# shapes 8192^2 / 28672x8192 / 8192x28672, 0.5% outliers): (32, 4) 66.3 / 226.5 / 273.3 us, the planes' dequant
# 63.8 / 227.5 / 273.7; (64, 4) 80.3 / 271.0 / 322.7; (64, 8) 71.5 / 245.5 / 288.6; (128, 4) 88.2 / 318.4 / 378.8
# (more rows per program: a longer outlier-chunk search per program).  No outliers: (32, 4) 58.9 / 210.9 / 205.8,
# the planes 57.5 / 218.4 / 220.3
CONFIG = (32, 4)
BR = 16  # outlier slots per chunk (gemm.DQ_BR)


supports = has_q8_words  # the half2 words at Q = 8 (prepare.words_cover)


@triton.jit
def dequant_half2_kernel(w_ptr, h_ptr, s_ptr, z_ptr, oi_ptr, ov_ptr, N, K, R, group_size,
                         stride_w, stride_h, stride_s, stride_z, stride_oi, stride_ov,
                         ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUPED: tl.constexpr, BN: tl.constexpr,
                         OUTLIERS: tl.constexpr, BR: tl.constexpr, NCH: tl.constexpr, ATOMIC: tl.constexpr):
    """w [BN rows, one 256-column block] = s * (code - z) (+ the block's outliers)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    blk = tl.program_id(1)
    i = tl.arange(0, 16)
    rows = h_ptr + offs_n[:, None] * stride_h + blk * 48 + i[None, :]  # int16 view: 48 per row per block
    r0 = tl.load(rows, mask=mask_n[:, None], other=0).to(tl.int32)
    r1 = tl.load(rows + 16, mask=mask_n[:, None], other=0).to(tl.int32)
    r2 = tl.load(rows + 32, mask=mask_n[:, None], other=0).to(tl.int32)
    g = (blk * 256) // group_size if GROUPED else 0  # a group holds whole blocks
    s = tl.load(s_ptr + offs_n * stride_s + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs_n * stride_z + g, mask=mask_n, other=0).to(tl.float32)[:, None]
    else:
        z = ZERO
    for slot in tl.static_range(16):
        c = block_code(r0, r1, r2, slot)
        kx = blk * 256 + slot * 16 + i
        tl.store(w_ptr + offs_n[:, None] * stride_w + kx[None, :],
                 ((c.to(tl.float32) - z) * s).to(w_ptr.dtype.element_ty), mask=mask_n[:, None] & (kx < K)[None, :])
    if OUTLIERS:
        add_span_outliers(w_ptr, oi_ptr, ov_ptr, offs_n, mask_n, blk * 256, 256, K, R, stride_w, stride_oi,
                          stride_ov, BR, NCH, ATOMIC)


def dequantize_half2(p, dtype, outliers=True, config=None):
    """Prepared dict with the Q = 8 half2 words -> dense weight [N, K] in dtype (outliers added: each rounded to
    dtype once more, as in gemm.dequantize)."""
    if not supports(p):
        raise QuantEaseError("dequantize_half2 needs 3-bit half2 words at Q = 8 (per channel or groups of a multiple "
                             f"of 256); got bits={p['bits']}, group_size={p['group_size']}, words "
                             f"{'absent' if p.get('words') is None else 'present'}")
    n, k = p["out_features"], p["in_features"]
    bn, warps = config or CONFIG
    words = p["words"].view(torch.int16)
    w = torch.empty(n, k, dtype=dtype, device=words.device)
    zeros, oi, ov = p["zeros"], p["outlier_idx"], p["outlier_val"]
    outliers = outliers and oi is not None
    r = oi.shape[1] if outliers else 0
    dequant_half2_kernel[(triton.cdiv(n, bn), triton.cdiv(k, 256))](
        w, words, p["scales"], zeros if zeros is not None else p["scales"], oi if outliers else words,
        ov if outliers else p["scales"], n, k, r, p["group_size"], w.stride(0), words.stride(0),
        p["scales"].stride(0), zeros.stride(0) if zeros is not None else 0, oi.stride(0) if outliers else 0,
        ov.stride(0) if outliers else 0,
        ZERO=4.0, HAS_ZEROS=zeros is not None, GROUPED=p["group_size"] != -1, BN=bn, OUTLIERS=outliers, BR=BR,
        NCH=triton.next_power_of_2(triton.cdiv(r, BR)) if outliers else 1, ATOMIC=w.is_cuda, num_warps=warps)
    return w
