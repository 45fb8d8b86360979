"""The split-K GEMM's prologue in one launch: the x^T copy that the outlier epilogue gathers from, and the zeroing of
out that the K splits add into.

Both are tiny (M x K and M x N 16-bit values) but each was a launch of its own (torch's transposed copy and fill)
before every gemm_half2 call with outliers and a split K: in vLLM at batch 32 on the H100 (benchmarks/results/
throughput.md, run 7) 128 of each per decode step, 309 + 157 us of a 5.86 ms step.  Here program i transposes
columns i BK .. i BK + BK - 1 of x (all M rows, BM at a time) and zeroes columns i BZ .. i BZ + BZ - 1 of out.

torch reference (what it writes): xt = x.t().contiguous() (a [K, M] buffer) and out.zero_().
"""
import torch
import triton
import triton.language as tl

# (BK columns of x, BZ columns of out, BM rows per step, num_warps): a [BM, BK] = 16 x 128 tile of 16-bit values is
# 4 KB, one 16-byte load per thread at 2 warps.  Not tuned on a GPU yet.
CONFIG = (128, 512, 16, 2)


@triton.jit
def prologue_kernel(x_ptr, xt_ptr, out_ptr, M, K, N, stride_xm, stride_xt, stride_om,
                    XT: tl.constexpr, ZERO: tl.constexpr, BK: tl.constexpr, BZ: tl.constexpr, BM: tl.constexpr):
    pid = tl.program_id(0)
    if XT:  # xt[k, m] = x[m, k] for this program's BK columns (programs past K store nothing)
        offs_k = pid * BK + tl.arange(0, BK)
        for m0 in range(0, M, BM):
            offs_m = m0 + tl.arange(0, BM)
            mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            v = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
            # stored as a [BK, BM] tile (triton moves it through shared memory: both sides stay coalesced)
            tl.store(xt_ptr + offs_k[:, None] * stride_xt + offs_m[None, :], tl.trans(v), mask=tl.trans(mask))
    if ZERO:  # out[:, this program's BZ columns] = 0
        offs_n = pid * BZ + tl.arange(0, BZ)
        zero = tl.zeros((BZ,), dtype=out_ptr.dtype.element_ty)
        for m in range(0, M):
            tl.store(out_ptr + m * stride_om + offs_n, zero, mask=offs_n < N)


def prologue(x, out, transpose, zero, config=None):
    """x [M, K] (stride(1) == 1), out [M, N]: returns (xt, its (k, m) strides) -- a [K, M] copy of x^T when
    transpose, else x itself with its own strides -- after zeroing out when zero.  One launch for both."""
    m, k = x.shape
    xt = torch.empty(k, m, dtype=x.dtype, device=x.device) if transpose else x
    if transpose or zero:
        bk, bz, bm, warps = config or CONFIG
        grid = (max(triton.cdiv(k, bk) if transpose else 0, triton.cdiv(out.shape[1], bz) if zero else 0),)
        prologue_kernel[grid](x, xt, out, m, k, out.shape[1], x.stride(0), m, out.stride(0),
                              XT=transpose, ZERO=zero, BK=bk, BZ=bz, BM=bm, num_warps=warps)
    return (xt, m, 1) if transpose else (x, 1, x.stride(0))
