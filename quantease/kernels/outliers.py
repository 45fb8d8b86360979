"""Sparse outlier add for the GEMM path: y[M, N] += x[M, K] @ H^T, H in ELL form (R slots per row).

Two kernels, both run after the GEMM, in place on y (stream order makes that safe):
- ell_add: one program per (BN rows, BM columns of y) walks all R slots, BR at a time: R / BR dependent
  idx (DRAM) -> gather (L2) steps per program, one read-modify-write of y.
- ell_split_add: the slots split over a second grid axis, RS per program, each program's idx / val tile and its
  gathers loaded at once (one idx -> gather round trip per program, no loop), partial sums added to y with atomics.
  Many short programs instead of few long chains: for small M, where the chain, not the work (M x N x R FMAs), is
  the cost.  Also the way to keep the outliers out of a GEMM's registers: the fused epilogue holds its gather tile
  beside the K loop's (gemm_half2 at (16, 64, 1 warp): 194 instead of 168 registers, 10 instead of 12 warps per SM).

The GEMV fuses this into its epilogue (M <= 4 rows: a few gathers per output).  At larger M every (n, slot)
needs a whole column of x, so gathering x[m, idx] with m as the slow index touches one 32-byte sector per
element; this kernel reads x transposed (xt [K, M], made by the wrapper) so that column is contiguous and the
gather is 16-byte vectors along M.  It runs after the GEMM, in place on y (stream order makes that safe).
Cost: M * N * R multiply-adds from L2-resident xt.
"""
import triton
import triton.language as tl

BN, BR, BM_MAX = 16, 8, 64
SPLIT_ELEMS = 4096  # ell_split_add: gathered x elements per program ([BN, RS, BM], 32 per thread at 4 warps)
SPLIT_RS_MAX = 32  # slots per program at most


@triton.jit
def slot_sums(x_ptr, oi_ptr, ov_ptr, offs_n, mask_n, offs_r, r_hi, offs_m, mask_m, stride_xk, stride_xm, stride_oi,
              stride_ov):
    """[BN, BM] float32: sum over the slots offs_r (those < r_hi) of val[n, r] * x[m, idx[n, r]], x read with
    strides (stride_xk, stride_xm) -- x itself (1, row stride) or its [K, M] transpose (row stride, 1)."""
    rmask = mask_n[:, None] & (offs_r[None, :] < r_hi)
    idx = tl.load(oi_ptr + offs_n[:, None] * stride_oi + offs_r[None, :], mask=rmask, other=0).to(tl.int32)
    val = tl.load(ov_ptr + offs_n[:, None] * stride_ov + offs_r[None, :], mask=rmask, other=0.0)
    xg = tl.load(x_ptr + idx[:, :, None] * stride_xk + offs_m[None, None, :] * stride_xm,
                 mask=rmask[:, :, None] & mask_m[None, None, :], other=0.0)
    return tl.sum(xg.to(tl.float32) * val.to(tl.float32)[:, :, None], axis=1)


@triton.jit
def add_tile(acc, y_ptr, offs_n, mask_n, offs_m, mask_m, stride_ym, ATOMIC: tl.constexpr):
    """y [M, N] += the y^T tile acc [BN, BM], in y's dtype: atomics (other programs add to the same tile), or on
    the CPU interpreter (no 16-bit atomics there; it runs programs one at a time) a plain add, which is exact."""
    ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    ymask = mask_n[:, None] & mask_m[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask, sem="relaxed")
    else:
        y = tl.load(ptrs, mask=ymask, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + acc.to(y_ptr.dtype.element_ty).to(tl.float32)).to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def ell_add_kernel(xt_ptr, y_ptr, oi_ptr, ov_ptr, M, N, R, stride_xt, stride_ym, stride_oi, stride_ov,
                   BN: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for r0 in range(0, R, BR):
        acc += slot_sums(xt_ptr, oi_ptr, ov_ptr, offs_n, mask_n, r0 + tl.arange(0, BR), R, offs_m, mask_m,
                         stride_xt, 1, stride_oi, stride_ov)
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


@triton.jit
def ell_split_kernel(x_ptr, y_ptr, oi_ptr, ov_ptr, M, N, R, stride_xk, stride_xm, stride_ym, stride_oi, stride_ov,
                     BN: tl.constexpr, RS: tl.constexpr, BM: tl.constexpr, ATOMIC: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_r = tl.program_id(1) * RS + tl.arange(0, RS)
    offs_m = tl.program_id(2) * BM + tl.arange(0, BM)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = slot_sums(x_ptr, oi_ptr, ov_ptr, offs_n, mask_n, offs_r, R, offs_m, mask_m, stride_xk, stride_xm,
                    stride_oi, stride_ov)
    add_tile(acc, y_ptr, offs_n, mask_n, offs_m, mask_m, stride_ym, ATOMIC)


def split_config(m, r):
    """(BN, RS, BM) for ell_split_add: BM up to 16 columns of y, RS up to SPLIT_RS_MAX slots, BN rows so that a
    program gathers about SPLIT_ELEMS x elements."""
    bm = min(16, triton.next_power_of_2(m))
    rs = min(SPLIT_RS_MAX, triton.next_power_of_2(max(r, 1)))
    return max(16, SPLIT_ELEMS // (rs * bm)), rs, bm


def ell_split_add(x, idx, val, out, config=None, xt=None, warps=4):
    """out [M, N] += x [M, K] @ H^T for ELL (idx, val) [N, R], the slots split over programs (see the module doc);
    config (BN, RS, BM) overrides split_config; xt: gather from this [K, M] copy of x (one sector per slot)
    instead of x itself (M sectors per slot).  Returns out."""
    m = x.shape[0]
    n, r = idx.shape
    if m == 0 or r == 0:
        return out
    bn, rs, bm = config or split_config(m, r)
    src, sk, sm = (x, 1, x.stride(0)) if xt is None else (xt, xt.stride(0), 1)
    grid = (triton.cdiv(n, bn), triton.cdiv(r, rs), triton.cdiv(m, bm))
    ell_split_kernel[grid](src, out, idx, val, m, n, r, sk, sm, out.stride(0), idx.stride(0), val.stride(0),
                           BN=bn, RS=rs, BM=bm, ATOMIC=x.is_cuda, num_warps=warps)
    return out
