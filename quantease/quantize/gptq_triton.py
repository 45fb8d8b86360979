"""Triton form of GPTQ's column loop on CUDA (same arithmetic as the torch loop in gptq.gptq), static grids.

The torch loop launches ~13 small kernels per column: on the H200 (session 8, the whole 8B shape) every layer of
4096 input columns took ~0.55 s whatever its rows (k_proj 1024 x 4096 0.58 s, gate_proj 14336 x 4096 0.56 s),
down_proj's 14336 columns 2.1 s -- launch-bound, ~135 us a column.  Here one launch does a block of B columns: each
program owns BM rows (in GPTQ a row's error only moves that row), keeps its [BM, B] slice of W in registers and
walks the columns in order: quantize column j, e = (w_j - q_j) / U_jj, then w_l -= e U_jl for the block's later
columns l (U: the upper Cholesky factor of Sigma^-1).  After each block one GEMM moves the rest of W, as in the
torch loop.  The interpreter gives the torch loop's codes exactly; on a GPU the update may be one FMA (one
rounding less).

Static grids only (per channel, act-order, or a fixed grid): the group fit in the middle of a sweep (groups
without act-order) stays in torch.
"""
import torch

from quantease.quantize import cd_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack triton: gptq falls back to torch
    triton = None

BM = 16       # rows per program
BLOCK = 128   # columns per launch (the register tile), GPTQ's usual block


if triton is not None:
    @triton.jit
    def _gptq_block(w_ptr, codes_ptr, err_ptr, u_ptr, scale_ptr, zero_ptr, N, K, i1, nb, maxq,
                    BM: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        cols = tl.arange(0, BLOCK)
        rmask = rows < N
        tile = rmask[:, None] & (cols < nb)[None, :]
        w1 = tl.load(w_ptr + rows[:, None] * K + i1 + cols[None, :], mask=tile, other=0.0)
        err = tl.zeros([BM, BLOCK], dtype=tl.float32)
        for i in range(0, nb):
            j = i1 + i
            col = tl.sum(tl.where(cols[None, :] == i, w1, 0.0), axis=1)  # exact: the other terms are 0
            p = rows * K + j
            s = tl.load(scale_ptr + p, mask=rmask, other=1.0)
            z = tl.load(zero_ptr + p, mask=rmask, other=0.0)
            c = tl.minimum(tl.maximum(cd_triton._rint(tl.div_rn(col, s)) + z, 0.0), maxq)  # == grid.quantize
            tl.store(codes_ptr + p, c, mask=rmask)
            e = tl.div_rn(col - s * (c - z), tl.load(u_ptr + j * K + j))
            u = tl.load(u_ptr + j * K + i1 + cols, mask=(cols > i) & (cols < nb), other=0.0)
            w1 -= e[:, None] * u[None, :]
            err = tl.where(cols[None, :] == i, e[:, None], err)
        tl.store(err_ptr + rows[:, None] * BLOCK + cols[None, :], err, mask=tile)


def columns(w, u, col_scale, col_zero, bits, block=BLOCK):
    """Same contract as gptq.columns for a static grid: the codes [N, K] of w [N, K] (float32) from the upper
    factor u [K, K] and per-column grids [N, K].  Works on a copy of w (the torch form, if this one fails, starts
    from the original); the block width is the kernel's BLOCK, whatever `block` says."""
    n, k = w.shape
    w, u = w.clone(memory_format=torch.contiguous_format), u.contiguous()
    col_scale, col_zero = col_scale.contiguous(), col_zero.contiguous()
    for t in (w, u, col_scale, col_zero):
        assert t.dtype == torch.float32
    codes = torch.empty_like(w)
    err = torch.empty(n, BLOCK, device=w.device, dtype=torch.float32)
    grid = (triton.cdiv(n, BM),)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        _gptq_block[grid](w, codes, err, u, col_scale, col_zero, n, k, i1, i2 - i1, float(2 ** bits - 1),
                          BM=BM, BLOCK=BLOCK)
        if i2 < k:
            w[:, i2:] -= err[:, :i2 - i1] @ u[i1:i2, i2:]
    return codes
