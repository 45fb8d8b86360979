"""GEMM path (prefill, M > 2): dequantized weight tiles into tl.dot, fp32 accumulation.

Reads the block layout of kernels/prepare.py.  Program (pid_m, pid_n) owns a [BM, BN] output tile and walks
K one 256-column block at a time: it loads the block's [BN, WPB] plane words once, and for each code slot j
(unrolled) unpacks a [BN, WPB] tile in the load's own layout -- columns 256 b + j WPB + q, q < WPB, contiguous,
so the matching x tile is a plain contiguous load and no reshape or gather is needed -- and issues
tl.dot(x_j [BM, WPB], w_j^T).  3-bit tiles use the GEMV's in-place unpack (two LOP3s and one FADD per weight
give c - z exactly).  Integer (code - zero) values are exact in fp16/bf16, so for per-channel grids
and groups of whole blocks (group_size % 256 == 0) the scale multiplies the fp32 partial product instead of
rounding s * (c - z) to 16 bits.  Other group sizes dequantize per element.  Outliers are added after the K
loop by a second launch (kernels/outliers.py), which reads x transposed so that the gathers are wide.

For M > ops.SWAP_MAX_M (CUDA) the dispatcher instead dequantizes the weight once (dequant_kernel, same unpack,
the outliers added in the same kernel) and calls cuBLAS (dequant_matmul): at M = 256 that measured 1.4-2.5x faster
than this fused kernel on the H100, 1.7-2.5x on the H200.
"""
import torch
import triton
import triton.language as tl

from quantease.kernels.gemv import _code3
from quantease.kernels.outliers import ell_add


# (BM, BN, num_warps, num_stages, GROUP_M) by M bucket; chosen ahead on the H100 (benchmarks/kernels.py)
CONFIGS = {
    16: (16, 128, 4, 3, 8),
    32: (16, 128, 4, 3, 8),
    64: (32, 128, 4, 3, 8),
    128: (128, 128, 8, 2, 8),
    256: (128, 128, 8, 2, 8),
}


def pick_config(m):
    for bucket in sorted(CONFIGS):
        if m <= bucket:
            return CONFIGS[bucket]
    return CONFIGS[max(CONFIGS)]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 operands: full-precision products, not tf32
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def slot_codes(a, a_hi, hs, h_hi, h_15, zb, j: tl.constexpr, BITS: tl.constexpr, W0: tl.constexpr,
               INPLACE: tl.constexpr, ASM: tl.constexpr):
    """Code slot j of a block's plane words [BN, WPB] as float32 c - zb (zb [BN]: the row's zero, or the
    symmetric one).  3-bit INPLACE: built in a float mantissa by two LOP3s, 2**(23 - p) + c, minus 2**(23 - p) + z:
    c - z exactly; else shift, mask, or in the plane-1 bit, convert."""
    if BITS == 3 and INPLACE:
        c = _code3(a, a_hi, hs, h_hi, h_15, j, ASM) - (zb[:, None] + (1 << (23 - 2 * (j % 8))))
    else:
        c = (a >> (W0 * j)) & ((1 << W0) - 1)
        if BITS == 3:
            c = c | (((hs >> ((2 * j + 2) % 32)) & 1) << 2)
        c = c.to(tl.float32) - zb[:, None]
    return c


@triton.jit
def group_dequant(c, zb, kx, offs_n, mask_n, K, group_size, s_ptr, z_ptr, stride_s, stride_z,
                  HAS_ZEROS: tl.constexpr, ZERO: tl.constexpr):
    """Groups that do not cover whole blocks: per element s * (c - z) from slot_codes' c - zb (kx: the columns)."""
    g = kx // group_size
    gmask = mask_n[:, None] & (kx < K)[None, :]
    s_e = tl.load(s_ptr + offs_n[:, None] * stride_s + g[None, :], mask=gmask, other=0.0)
    if HAS_ZEROS:
        z_e = tl.load(z_ptr + offs_n[:, None] * stride_z + g[None, :], mask=gmask, other=0)
        c = c + zb[:, None] - z_e.to(tl.float32)
    else:
        c = c + zb[:, None] - ZERO
    return c * s_e.to(tl.float32)


@triton.jit
def block_loads(p0_ptr, p1_ptr, offs_n, mask_n, stride_p0, stride_p1, blk, q, hcol, BITS: tl.constexpr,
                WPB: tl.constexpr):
    """The raw plane words of one 256-column block for rows offs_n (masked rows read 0): plane 0 [BN, WPB] and,
    for 3-bit, the plane-1 word of each plane-0 word (hcol); block_split makes slot_codes' operands of them."""
    a = tl.load(p0_ptr + offs_n[:, None] * stride_p0 + (blk * WPB + q)[None, :], mask=mask_n[:, None], other=0)
    if BITS == 3:
        h = tl.load(p1_ptr + offs_n[:, None] * stride_p1 + (blk * 8 + hcol)[None, :], mask=mask_n[:, None],
                    other=0)
    else:
        h = a  # unread (slot_codes takes it for 3-bit only); dead code after compilation
    return a, h


@triton.jit
def block_split(a, h, shift, BITS: tl.constexpr, INPLACE: tl.constexpr):
    """block_loads' words as slot_codes takes them: the plane-1 word shifted by `shift` ([1, WPB] or [BN, WPB])
    so its bits line up, and for the in-place unpack the words' high and low halves."""
    if BITS == 3:
        hs = h >> shift
    else:
        hs = a
    if BITS == 3 and INPLACE:
        a_hi = a >> 16
        h_hi = hs >> 16
        h_15 = hs << 16
    else:
        a_hi = a
        h_hi = a
        h_15 = a
    return a, hs, a_hi, h_hi, h_15


@triton.jit
def block_words(p0_ptr, p1_ptr, offs_n, mask_n, stride_p0, stride_p1, blk, q, hcol, shift,
                BITS: tl.constexpr, INPLACE: tl.constexpr, WPB: tl.constexpr):
    """block_loads then block_split: one block's words, ready for slot_codes."""
    a, h = block_loads(p0_ptr, p1_ptr, offs_n, mask_n, stride_p0, stride_p1, blk, q, hcol, BITS, WPB)
    return block_split(a, h, shift, BITS, INPLACE)


@triton.jit
def block_grid(s_ptr, z_ptr, offs_n, mask_n, stride_s, stride_z, blk, group_size, HAS_ZEROS: tl.constexpr,
               ZERO: tl.constexpr, BN: tl.constexpr):
    """Scale and zero [BN] of the group holding 256-column block blk (groups of whole blocks: GROUP_MODE 1)."""
    g = (blk * 256) // group_size
    sb = tl.load(s_ptr + offs_n * stride_s + g, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zb = tl.load(z_ptr + offs_n * stride_z + g, mask=mask_n, other=0).to(tl.float32)
    else:
        zb = tl.full((BN,), ZERO, tl.float32)
    return sb, zb


@triton.jit
def qgemm_kernel(x_ptr, y_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, b_ptr,
                 M, N, K, group_size,
                 stride_xm, stride_ym, stride_p0, stride_p1, stride_s, stride_z,
                 BITS: tl.constexpr, W0: tl.constexpr, ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 INPLACE: tl.constexpr, ASM: tl.constexpr, IEEE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    # GROUP_MODE 0: per channel; 1: groups of whole 256-column blocks; 2: per element
    PW: tl.constexpr = 32 // W0  # code slots per word
    WPB: tl.constexpr = 8 * W0  # plane-0 words per block = columns per slot
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # grouped ordering: programs that run together share weight tiles in L2
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    q = tl.arange(0, WPB)
    hcol = (q // 16) * 8 + (q % 8)  # 3-bit: the plane-1 word of each plane-0 word
    hsh = (q % 16) // 8
    # IEEE: float32 operands (float32 activations; bf16 under the interpreter, whose bf16 dot is broken)
    dtype = tl.float32 if IEEE else x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_ZEROS:
        zn = tl.load(z_ptr + offs_n * stride_z, mask=mask_n, other=0).to(tl.float32)
    else:
        zn = tl.full((BN,), ZERO, tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    for blk in range(0, tl.cdiv(K, 256)):
        a, hs, a_hi, h_hi, h_15 = block_words(p0_ptr, p1_ptr, offs_n, mask_n, stride_p0, stride_p1, blk, q, hcol,
                                              hsh[None, :], BITS, INPLACE, WPB)
        if GROUP_MODE == 1:
            sb, zb = block_grid(s_ptr, z_ptr, offs_n, mask_n, stride_s, stride_z, blk, group_size, HAS_ZEROS, ZERO,
                                BN)
        else:
            zb = zn
        part = tl.zeros((BM, BN), dtype=tl.float32)
        for j in tl.static_range(PW):
            kx = blk * 256 + j * WPB + q
            x = tl.load(x_rows + kx[None, :], mask=mask_m[:, None] & (kx < K)[None, :], other=0.0).to(dtype)
            c = slot_codes(a, a_hi, hs, h_hi, h_15, zb, j, BITS, W0, INPLACE, ASM)
            if GROUP_MODE == 2:
                c = group_dequant(c, zb, kx, offs_n, mask_n, K, group_size, s_ptr, z_ptr, stride_s, stride_z,
                                  HAS_ZEROS, ZERO)
            part = _dot(x, tl.trans(c.to(dtype)), part, IEEE)
        if GROUP_MODE == 1:
            acc += part * sb[None, :]
        else:
            acc += part
    if GROUP_MODE == 0:
        s = tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def group_mode(group_size):
    if group_size == -1:
        return 0
    return 1 if group_size % 256 == 0 else 2


def qgemm(x, p, bias, out, config=None, inplace=True, asm=True):
    """x [M, K] (stride(1) == 1), prepared dict p, bias [N] | None, out [M, N] -> out."""
    m, k = x.shape
    n = p["out_features"]
    bm, bn, warps, stages, group_m = config or pick_config(m)
    if config is None:
        # small N: narrower tiles until there are >= 128 programs (on the H100, BN=64 beat 128 at N=8192 with
        # 128 programs, 128 beat 64 at N=28672)
        while bn > 32 and triton.cdiv(n, bn) * triton.cdiv(m, bm) < 128:
            bn //= 2
    bits = p["bits"]
    mode = group_mode(p["group_size"])
    plane1 = p["plane1"] if p["plane1"] is not None else p["plane0"]
    zeros = p["zeros"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    qgemm_kernel[grid](
        x, out, p["plane0"], plane1, p["scales"], zeros if zeros is not None else p["scales"],
        bias if bias is not None else p["scales"],
        m, n, k, p["group_size"],
        x.stride(0), out.stride(0), p["plane0"].stride(0), plane1.stride(0), p["scales"].stride(0),
        zeros.stride(0) if zeros is not None else 0,
        BITS=bits, W0=2 if bits == 3 else bits, ZERO=2 ** (bits - 1), HAS_ZEROS=zeros is not None,
        GROUP_MODE=mode, HAS_BIAS=bias is not None,
        INPLACE=inplace and bits == 3 and mode != 2, ASM=asm and x.is_cuda,
        IEEE=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda),
        BM=bm, BN=bn, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    if p["outlier_idx"] is not None:
        ell_add(x, p["outlier_idx"], p["outlier_val"], out)
    return out


# ---- large M: dequantize once to x's dtype, then cuBLAS ----------------------------------------------------------
# Above ops.SWAP_MAX_M rows the fused kernels' per-tile unpack (redone for every BM rows) costs more than writing
# the dense weight once and handing it to cuBLAS (benchmarks/kernels.py, kernels_swap.py measured the crossover).
DQ_BN = 32
# 256-column blocks per dequant program.  1 is what the H200 measured (results/kernels_h200.md, session 5); more
# blocks per program spread the outlier add's chain of dependent loads (chunk bounds, then chunks) over more
# columns -- prepared, not yet timed: `kernels.py --parts --dq-blocks 1,2,4` (kernel_notes.md "Session 5")
DQ_BLOCKS = 1
DQ_BR = 16  # outlier slots per chunk of the dequant kernel's add (chunks out of the block's range are skipped)


@triton.jit
def _dequant_block(w_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, offs_n, mask_n, blk, K, group_size, stride_w, stride_p0,
                   stride_p1, stride_s, stride_z, BITS: tl.constexpr, W0: tl.constexpr,
                   ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_CHANNEL: tl.constexpr, ASM: tl.constexpr,
                   GUARD: tl.constexpr):
    """w[offs_n, 256 blk .. + 256] = s * (code - z); GUARD: the block may lie past K (reads and writes nothing)."""
    PW: tl.constexpr = 32 // W0
    WPB: tl.constexpr = 8 * W0
    q = tl.arange(0, WPB)
    lmask = (mask_n & (blk * 256 + offs_n * 0 < K)) if GUARD else mask_n
    a, hs, a_hi, h_hi, h_15 = block_words(p0_ptr, p1_ptr, offs_n, lmask, stride_p0, stride_p1, blk, q,
                                          (q // 16) * 8 + (q % 8), ((q % 16) // 8)[None, :], BITS, True, WPB)
    if PER_CHANNEL:  # one scale / zero per row: loaded once per block, not per slot
        s_row = tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if HAS_ZEROS:
            z_row = tl.load(z_ptr + offs_n * stride_z, mask=mask_n, other=0).to(tl.float32)[:, None]
    for j in tl.static_range(PW):
        kx = blk * 256 + j * WPB + q
        wmask = mask_n[:, None] & (kx < K)[None, :]
        if PER_CHANNEL:
            s = s_row
            if HAS_ZEROS:
                z = z_row
            else:
                z = ZERO
        else:
            g = kx // group_size
            s = tl.load(s_ptr + offs_n[:, None] * stride_s + g[None, :], mask=wmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n[:, None] * stride_z + g[None, :], mask=wmask, other=0).to(tl.float32)
            else:
                z = ZERO
        if BITS == 3:
            c = _code3(a, a_hi, hs, h_hi, h_15, j, ASM) - (1 << (23 - 2 * (j % 8)))
        else:
            c = ((a >> (W0 * j)) & ((1 << W0) - 1)).to(tl.float32)
        tl.store(w_ptr + offs_n[:, None] * stride_w + kx[None, :], ((c - z) * s).to(w_ptr.dtype.element_ty),
                 mask=wmask)


@triton.jit
def dequant_kernel(w_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, oi_ptr, ov_ptr, N, K, R, group_size,
                   stride_w, stride_p0, stride_p1, stride_s, stride_z, stride_oi, stride_ov,
                   BITS: tl.constexpr, W0: tl.constexpr, ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr,
                   PER_CHANNEL: tl.constexpr, ASM: tl.constexpr, BN: tl.constexpr, BLOCKS: tl.constexpr,
                   OUTLIERS: tl.constexpr, BR: tl.constexpr, NCH: tl.constexpr, ATOMIC: tl.constexpr):
    """w [N, K] = s * (code - z) (+ the outliers): BN rows x BLOCKS 256-column blocks per program (same unpack as
    the GEMM), then the outlier slots of those rows that fall in its columns."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    for b in tl.static_range(BLOCKS):
        _dequant_block(w_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, offs_n, mask_n, tl.program_id(1) * BLOCKS + b, K,
                       group_size, stride_w, stride_p0, stride_p1, stride_s, stride_z, BITS, W0, ZERO, HAS_ZEROS,
                       PER_CHANNEL, ASM, BLOCKS > 1)
    if OUTLIERS:  # the slots of these rows that fall in its columns, added onto the tiles just written (in L2)
        add_span_outliers(w_ptr, oi_ptr, ov_ptr, offs_n, mask_n, tl.program_id(1) * BLOCKS * 256, BLOCKS * 256, K, R,
                          stride_w, stride_oi, stride_ov, BR, NCH, ATOMIC)


@triton.jit
def add_span_outliers(w_ptr, oi_ptr, ov_ptr, offs_n, mask_n, lo, SPAN: tl.constexpr, K, R, stride_w, stride_oi,
                      stride_ov, BR: tl.constexpr, NCH: tl.constexpr, ATOMIC: tl.constexpr):
    """w[n, lo .. lo + SPAN] += the outlier slots of rows offs_n that fall in those columns: the dequant kernels'
    add, onto the tile the program has just written (L2 hits).  ATOMIC: 16-bit atomics (CUDA); else a slot
    column at a time (the CPU interpreter)."""
    if ATOMIC:
        tl.debug_barrier()  # this program's stores before its adds
    # a row's indices are sorted: the chunks of BR slots that can reach these columns are those whose first
    # index is below its end and whose last is not below its start in some row.  The bounds of all NCH chunks
    # come in one load.  Walking all R slots per block instead made M = 256 at 8192x28672 take 619 us (H200;
    # 370 without outliers), and a load-then-branch per chunk made each program a chain of R / BR round trips
    c = tl.arange(0, NCH)
    cmask = mask_n[:, None] & (c[None, :] * BR < R)
    row = oi_ptr + offs_n[:, None] * stride_oi
    first = tl.load(row + c[None, :] * BR, mask=cmask, other=K).to(tl.int32)
    last = tl.load(row + tl.minimum(c[None, :] * BR + BR, R) - 1, mask=cmask, other=-1).to(tl.int32)
    need = tl.max(((last >= lo) & (first < lo + SPAN)).to(tl.int32), axis=0)  # [NCH]
    c_lo = tl.min(tl.where(need > 0, c, NCH), axis=0)
    c_hi = tl.max(tl.where(need > 0, c, -1), axis=0)
    for cc in range(c_lo, c_hi + 1):
        r0 = cc * BR
        if ATOMIC:  # fire-and-forget adds: duplicate indices sum, padding (value 0) is masked
            offs_r = r0 + tl.arange(0, BR)
            rmask = mask_n[:, None] & (offs_r[None, :] < R)
            idx = tl.load(oi_ptr + offs_n[:, None] * stride_oi + offs_r[None, :], mask=rmask, other=0)
            idx = idx.to(tl.int32)
            val = tl.load(ov_ptr + offs_n[:, None] * stride_ov + offs_r[None, :], mask=rmask, other=0.0)
            hit = rmask & (val != 0) & (idx >= lo) & (idx < lo + SPAN)
            tl.atomic_add(w_ptr + offs_n[:, None] * stride_w + idx, val.to(w_ptr.dtype.element_ty),
                          mask=hit, sem="relaxed")
        else:  # the CPU interpreter (no 16-bit atomics): a slot column at a time, rows distinct in a step
            for r in range(r0, tl.minimum(r0 + BR, R)):
                idx = tl.load(oi_ptr + offs_n * stride_oi + r, mask=mask_n, other=0).to(tl.int32)
                val = tl.load(ov_ptr + offs_n * stride_ov + r, mask=mask_n, other=0.0)
                hit = mask_n & (idx >= lo) & (idx < lo + SPAN)
                ptrs = w_ptr + offs_n * stride_w + idx
                w = tl.load(ptrs, mask=hit, other=0.0).to(tl.float32)
                tl.store(ptrs, (w + val.to(tl.float32)).to(w_ptr.dtype.element_ty), mask=hit)


def dequantize(p, dtype, outliers=False, blocks=None):
    """Prepared dict -> dense weight [N, K] in dtype, on the GPU; outliers=True adds them in the same kernel
    (each rounded to dtype once more).  The adds touch lines the program has just written: as a separate
    scatter after the whole weight they cost +28 us at 8192^2 with 0.5% (H200, kernels.py --parts: 57.9 -> 85.7)."""
    n, k, bits = p["out_features"], p["in_features"], p["bits"]
    w = torch.empty(n, k, dtype=dtype, device=p["plane0"].device)
    plane1 = p["plane1"] if p["plane1"] is not None else p["plane0"]
    zeros, oi, ov = p["zeros"], p["outlier_idx"], p["outlier_val"]
    outliers = outliers and oi is not None
    blocks = blocks or DQ_BLOCKS
    dequant_kernel[(triton.cdiv(n, DQ_BN), triton.cdiv(k, 256 * blocks))](
        w, p["plane0"], plane1, p["scales"], zeros if zeros is not None else p["scales"],
        oi if outliers else p["plane0"], ov if outliers else p["scales"], n, k, oi.shape[1] if outliers else 0,
        p["group_size"], w.stride(0), p["plane0"].stride(0), plane1.stride(0), p["scales"].stride(0),
        zeros.stride(0) if zeros is not None else 0, oi.stride(0) if outliers else 0, ov.stride(0) if outliers else 0,
        BITS=bits, W0=2 if bits == 3 else bits, ZERO=float(2 ** (bits - 1)), HAS_ZEROS=zeros is not None,
        PER_CHANNEL=p["group_size"] == -1, ASM=w.is_cuda, BN=DQ_BN, BLOCKS=blocks, OUTLIERS=outliers, BR=DQ_BR,
        NCH=triton.next_power_of_2(triton.cdiv(oi.shape[1], DQ_BR)) if outliers else 1, ATOMIC=w.is_cuda,
        num_warps=4)
    return w


def dequant_matmul(x, p, bias, out):
    """Large-M path: dense weight (this call only) with the outliers added in (dequantize), then one cuBLAS call.
    That costs N x R adds; adding x @ H^T after the GEMM (the ELL kernel, the small-M epilogues) costs M x N x R
    gathers: +21-55% at M = 256 on the H200 in session 4, +6-22% now (results/kernels_h200.md), and vLLM's prefill
    went from 0.59x to 0.93x fp16.  The outlier lands on the weight rounded to x's dtype: one more rounding of those
    few elements."""
    if p.get("plane0") is None:  # the half2 words alone (prepare.drop_planes)
        from quantease.kernels.dequant_half2 import dequantize_half2

        w = dequantize_half2(p, x.dtype)
    else:
        w = dequantize(p, x.dtype, outliers=True)
    if bias is not None:
        torch.addmm(bias.to(out.dtype), x, w.t(), out=out)
    else:
        torch.matmul(x, w.t(), out=out)
    return out
