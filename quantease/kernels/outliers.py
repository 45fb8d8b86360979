"""Sparse outlier add for the GEMM path: y[M, N] += x[M, K] @ H^T, H in ELL form (R slots per row).

The GEMV fuses this into its epilogue (M <= 4 rows: a few gathers per output).  At larger M every (n, slot)
needs a whole column of x, so gathering x[m, idx] with m as the slow index touches one 32-byte sector per
element; this kernel reads x transposed (xt [K, M], made by the wrapper) so that column is contiguous and the
gather is 16-byte vectors along M.  It runs after the GEMM, in place on y (stream order makes that safe).
Cost: M * N * R multiply-adds from L2-resident xt.
"""
import triton
import triton.language as tl

BN, BR, BM_MAX = 16, 8, 64


@triton.jit
def ell_add_kernel(xt_ptr, y_ptr, oi_ptr, ov_ptr, M, N, R, stride_xt, stride_ym, stride_oi, stride_ov,
                   BN: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for r0 in range(0, R, BR):
        offs_r = r0 + tl.arange(0, BR)
        rmask = mask_n[:, None] & (offs_r[None, :] < R)
        idx = tl.load(oi_ptr + offs_n[:, None] * stride_oi + offs_r[None, :], mask=rmask, other=0).to(tl.int32)
        val = tl.load(ov_ptr + offs_n[:, None] * stride_ov + offs_r[None, :], mask=rmask, other=0.0)
        xg = tl.load(xt_ptr + idx[:, :, None] * stride_xt + offs_m[None, None, :],
                     mask=rmask[:, :, None] & mask_m[None, None, :], other=0.0)
        acc += tl.sum(xg.to(tl.float32) * val.to(tl.float32)[:, :, None], axis=1)
    ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    ymask = mask_n[:, None] & mask_m[None, :]
    y = tl.load(ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=ymask)


def ell_add(x, idx, val, out):
    """out [M, N] += x [M, K] @ H^T for ELL (idx, val) [N, R]; returns out."""
    m = x.shape[0]
    n, r = idx.shape
    xt = x.t().contiguous()
    bm = min(BM_MAX, max(16, triton.next_power_of_2(m)))
    grid = (triton.cdiv(n, BN), triton.cdiv(m, bm))
    ell_add_kernel[grid](xt, out, idx, val, m, n, r, xt.stride(0), out.stride(0), idx.stride(0), val.stride(0),
                         BN=BN, BR=BR, BM=bm, num_warps=4)
    return out
