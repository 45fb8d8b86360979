"""GEMV path (decode, M <= 2; takes up to 4): y = x @ dequant(Q)^T + x @ H^T (+ bias), CUDA cores, fp32 accumulation.

Reads the block layout of kernels/prepare.py.  One program owns BN output rows and walks the whole of K (no
split-K: no atomics, no memset launch).  A K step loads a [BN, BKW] tile of plane words (16-byte loads along
K) and, for each of the 32 / w code slots j of a word (unrolled), one contiguous x vector: every tensor stays in
the load's 2-D layout, so there is no reshape and no shared-memory shuffle.

Per weight the 3-bit unpack is two LOP3s (no shifts): the code's bits are masked in place (bit p up) and OR-ed
into the mantissa of 2**(23 - p), whose last place is worth 2**-p, giving the float 2**(23 - p) + c exactly;
one FADD and the FMA follow.  The next step's words are loaded before this step's math (register prefetch).
Per-channel grids fold the zero out of the loop:
    y = s * (sum_k x_k c_k - z * sum_k x_k).
Other group sizes dequantize per element (gathered scale/zero, L1 hits).  Outliers: after the loop, R slots per
row: every program gathers the same number of x values (balanced), from x rows already in L1/L2.
"""
import triton
import triton.language as tl

# (BN, blocks of 256 columns per K step, num_warps, num_stages) by M; chosen on the H100 (benchmarks/kernels.py)
CONFIGS = {1: (32, 4, 4, 3), 2: (8, 4, 1, 3), 4: (16, 4, 4, 3)}
MAX_M = 4


def pick_config(m):
    for bucket in sorted(CONFIGS):
        if m <= bucket:
            return CONFIGS[bucket]
    raise ValueError(f"GEMV path takes M <= {MAX_M}, got {m}")


@triton.jit
def _merge(a, ma: tl.constexpr, h, mh: tl.constexpr, magic: tl.constexpr, ASM: tl.constexpr):
    """(a & ma) | (h & mh) | magic, as two LOP3s (ptxas makes three of the plain expression)."""
    if ASM:
        t = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                      [a, tl.full(a.shape, ma, tl.int32), tl.full(a.shape, magic, tl.int32)],
                                      dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [h, tl.full(a.shape, mh, tl.int32), t], dtype=tl.int32, is_pure=True,
                                         pack=1)
    else:
        return (a & ma) | (h & mh) | magic


@triton.jit
def _code3(a, a_hi, hs, h_hi, h_15, j: tl.constexpr, ASM: tl.constexpr):
    """3-bit code of slot j as float32 2**(23 - p) + c, p = 2 (j % 8): the code's 3 bits are OR-ed in place
    (bit p up) into the mantissa of 2**(23 - p), whose last place is worth 2**-p."""
    p: tl.constexpr = 2 * (j % 8)
    magic: tl.constexpr = (150 - p) << 23  # float32 bits of 2**(23 - p)
    if j < 8:
        bits = _merge(a, 3 << p, hs, 4 << p, magic, ASM)
    elif j < 15:
        bits = _merge(a_hi, 3 << p, h_hi, 4 << p, magic, ASM)
    else:
        bits = _merge(a_hi, 3 << p, h_15, 4 << p, magic, ASM)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def ell_rows(y, x_ptr, oi_ptr, ov_ptr, offs_n, mask_n, start, R, stride_oi, stride_ov, m, M, BR: tl.constexpr):
    """y [BN] += sum over ELL slots start..R of val[n, r] * x_m[idx[n, r]] (x_ptr: row m of x; rows m >= M read
    nothing): the GEMVs' fused outlier add."""
    for r0 in range(start, R, BR):
        offs_r = r0 + tl.arange(0, BR)
        rmask = mask_n[:, None] & (offs_r[None, :] < R)
        idx = tl.load(oi_ptr + offs_n[:, None] * stride_oi + offs_r[None, :], mask=rmask, other=0)
        val = tl.load(ov_ptr + offs_n[:, None] * stride_ov + offs_r[None, :], mask=rmask, other=0.0)
        xg = tl.load(x_ptr + idx.to(tl.int32), mask=rmask & (offs_r[None, :] * 0 + m < M), other=0.0)
        y += tl.sum(xg.to(tl.float32) * val.to(tl.float32), axis=1)
    return y


@triton.jit
def _fma_row(acc, xs, x_ptr, kx, kmask, m, M, wv, PER_CHANNEL: tl.constexpr, NO_MASK: tl.constexpr):
    """Row m of x: acc [BN, BKW] += wv * x_m for one code slot; xs [BKW] += x_m (per channel)."""
    if NO_MASK:  # M == 1 and whole steps: every x load is in bounds, skip the compare + select per element
        x = tl.load(x_ptr + kx).to(tl.float32)
    else:  # (the row test in tensor form: the interpreter rejects a scalar one)
        x = tl.load(x_ptr + kx, mask=kmask & (kx * 0 + m < M), other=0.0).to(tl.float32)
    acc += wv * x[None, :]
    if PER_CHANNEL:
        xs += x
    return acc, xs


@triton.jit
def _finish_row(acc, xs, y_ptr, m, M, s, z, offs_n, mask_n, bias, x_ptr, oi_ptr, ov_ptr, R, stride_oi, stride_ov,
                PER_CHANNEL: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
                BN: tl.constexpr, BR: tl.constexpr):
    y = tl.sum(acc, axis=1)
    if PER_CHANNEL:
        y = s * (y - z * tl.sum(xs, axis=0))
    if HAS_OUTLIERS:
        y = ell_rows(y, x_ptr, oi_ptr, ov_ptr, offs_n, mask_n, 0, R, stride_oi, stride_ov, m, M, BR)
    if HAS_BIAS:
        y += bias
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n & (offs_n * 0 + m < M))


@triton.jit
def qgemv_kernel(x_ptr, y_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, oi_ptr, ov_ptr, b_ptr,
                 M, N, K, R, NW0, NW1, group_size,
                 stride_xm, stride_ym, stride_p0, stride_p1, stride_s, stride_z, stride_oi, stride_ov,
                 BITS: tl.constexpr, W0: tl.constexpr, ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 PER_CHANNEL: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 INPLACE: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr, EVEN_K: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, BR: tl.constexpr):
    PW: tl.constexpr = 32 // W0  # code slots per word
    WPB: tl.constexpr = 8 * W0  # plane-0 words per 256-column block
    BKW: tl.constexpr = BKB * WPB
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    w = tl.arange(0, BKW)
    xcol = w + (w // WPB) * (256 - WPB)  # column of slot 0 of each word, from the step's first column
    hcol = (w // 16) * 8 + (w % 8)  # 3-bit: the plane-1 word of each plane-0 word
    hsh = (w % 16) // 8
    acc0 = tl.zeros((BN, BKW), dtype=tl.float32)
    acc1 = tl.zeros((BN, BKW), dtype=tl.float32)
    acc2 = tl.zeros((BN, BKW), dtype=tl.float32)
    acc3 = tl.zeros((BN, BKW), dtype=tl.float32)
    xs0 = tl.zeros((BKW,), dtype=tl.float32)
    xs1 = tl.zeros((BKW,), dtype=tl.float32)
    xs2 = tl.zeros((BKW,), dtype=tl.float32)
    xs3 = tl.zeros((BKW,), dtype=tl.float32)
    p0_row = p0_ptr + offs_n[:, None] * stride_p0 + w[None, :]
    p1_row = p1_ptr + offs_n[:, None] * stride_p1 + hcol[None, :]
    steps = tl.cdiv(K, 256 * BKB)
    # a last, partial step (blocks % BKB != 0) masks whole blocks: the masks stay 16-word uniform (wide loads)
    # weights are read once: evict_first keeps x and the outlier tables in L2
    a_nx = tl.load(p0_row, mask=mask_n[:, None] & (w < NW0)[None, :], other=0, eviction_policy="evict_first")
    h_nx = a_nx
    if BITS == 3:
        h_nx = tl.load(p1_row, mask=mask_n[:, None] & (hcol < NW1)[None, :], other=0,
                       eviction_policy="evict_first")
    for t in range(0, steps):
        k0 = t * (256 * BKB)
        if PREFETCH:  # this step's words were loaded last step; load the next step's before the math
            a = a_nx
            hs = h_nx
            a_nx = tl.load(p0_row + (t + 1) * BKW, mask=mask_n[:, None] & ((t + 1) * BKW + w < NW0)[None, :],
                           other=0, eviction_policy="evict_first")
            if BITS == 3:
                h_nx = tl.load(p1_row + (t + 1) * (8 * BKB),
                               mask=mask_n[:, None] & ((t + 1) * (8 * BKB) + hcol < NW1)[None, :],
                               other=0, eviction_policy="evict_first")
        else:
            a = tl.load(p0_row + t * BKW, mask=mask_n[:, None] & (t * BKW + w < NW0)[None, :], other=0,
                        eviction_policy="evict_first")
            hs = a
            if BITS == 3:
                hs = tl.load(p1_row + t * (8 * BKB), mask=mask_n[:, None] & (t * (8 * BKB) + hcol < NW1)[None, :],
                             other=0, eviction_policy="evict_first")
        if BITS == 3:
            hs = hs >> hsh[None, :]
            if INPLACE:
                a_hi = a >> 16
                h_hi = hs >> 16
                h_15 = hs << 16
        for j in tl.static_range(PW):
            kx = k0 + xcol + j * WPB
            kmask = kx < K
            if BITS == 3 and INPLACE:
                f = _code3(a, a_hi, hs, h_hi, h_15, j, ASM) - (1 << (23 - 2 * (j % 8)))
            else:
                c = (a >> (W0 * j)) & ((1 << W0) - 1)
                if BITS == 3:
                    c = c | (((hs >> ((2 * j + 2) % 32)) & 1) << 2)
                f = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            if PER_CHANNEL:
                wv = f
            else:
                g = kx // group_size
                gmask = mask_n[:, None] & kmask[None, :]
                s_e = tl.load(s_ptr + offs_n[:, None] * stride_s + g[None, :], mask=gmask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    z_e = tl.load(z_ptr + offs_n[:, None] * stride_z + g[None, :], mask=gmask, other=0).to(tl.float32)
                    wv = (f - z_e) * s_e
                else:
                    wv = (f - ZERO) * s_e
            acc0, xs0 = _fma_row(acc0, xs0, x_ptr, kx, kmask, 0, M, wv, PER_CHANNEL, EVEN_K and BM == 1)
            if BM > 1:
                acc1, xs1 = _fma_row(acc1, xs1, x_ptr + stride_xm, kx, kmask, 1, M, wv, PER_CHANNEL, False)
            if BM > 2:
                acc2, xs2 = _fma_row(acc2, xs2, x_ptr + 2 * stride_xm, kx, kmask, 2, M, wv, PER_CHANNEL, False)
                acc3, xs3 = _fma_row(acc3, xs3, x_ptr + 3 * stride_xm, kx, kmask, 3, M, wv, PER_CHANNEL, False)
    s = tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs_n * stride_z, mask=mask_n, other=0).to(tl.float32)
    else:
        z = tl.full((BN,), ZERO, tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _finish_row(acc0, xs0, y_ptr, 0, M, s, z, offs_n, mask_n, bias, x_ptr, oi_ptr, ov_ptr, R, stride_oi,
                stride_ov, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BN, BR)
    if BM > 1:
        _finish_row(acc1, xs1, y_ptr + stride_ym, 1, M, s, z, offs_n, mask_n, bias, x_ptr + stride_xm, oi_ptr,
                    ov_ptr, R, stride_oi, stride_ov, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BN, BR)
    if BM > 2:
        _finish_row(acc2, xs2, y_ptr + 2 * stride_ym, 2, M, s, z, offs_n, mask_n, bias, x_ptr + 2 * stride_xm,
                    oi_ptr, ov_ptr, R, stride_oi, stride_ov, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BN, BR)
        _finish_row(acc3, xs3, y_ptr + 3 * stride_ym, 3, M, s, z, offs_n, mask_n, bias, x_ptr + 3 * stride_xm,
                    oi_ptr, ov_ptr, R, stride_oi, stride_ov, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BN, BR)


def qgemv(x, p, bias, out, config=None, inplace=True, asm=True, prefetch=True):
    """x [M <= 4, K] (stride(1) == 1), prepared dict p, bias [N] | None, out [M, N] -> out."""
    m, k = x.shape
    n = p["out_features"]
    bn, bkb, warps, stages = config or pick_config(m)
    bm = 1 if m == 1 else (2 if m == 2 else 4)
    assert m <= bm <= MAX_M
    bits = p["bits"]
    plane1 = p["plane1"] if p["plane1"] is not None else p["plane0"]
    zeros, oi, ov = p["zeros"], p["outlier_idx"], p["outlier_val"]
    has_out = oi is not None
    r = oi.shape[1] if has_out else 0
    br = max(2, min(32, triton.next_power_of_2(max(r, 1))))
    per_channel = p["group_size"] == -1
    qgemv_kernel[(triton.cdiv(n, bn),)](
        x, out, p["plane0"], plane1, p["scales"], zeros if zeros is not None else p["scales"],
        oi if has_out else p["plane0"], ov if has_out else p["scales"], bias if bias is not None else p["scales"],
        m, n, k, r, p["plane0"].shape[1], plane1.shape[1], p["group_size"],
        x.stride(0), out.stride(0), p["plane0"].stride(0), plane1.stride(0), p["scales"].stride(0),
        zeros.stride(0) if zeros is not None else 0, oi.stride(0) if has_out else 0, ov.stride(0) if has_out else 0,
        BITS=bits, W0=2 if bits == 3 else bits, ZERO=float(2 ** (bits - 1)), HAS_ZEROS=zeros is not None,
        PER_CHANNEL=per_channel, HAS_OUTLIERS=has_out, HAS_BIAS=bias is not None,
        INPLACE=inplace and bits == 3 and per_channel, ASM=x.is_cuda and asm, PREFETCH=prefetch,
        EVEN_K=k % (256 * bkb) == 0,  # no partial block, no partial step: every x load in bounds
        BM=bm, BN=bn, BKB=bkb, BR=br, num_warps=warps, num_stages=stages)
    return out
