"""GEMV v2 (decode, small M): two weights per logic op -- 3-bit codes unpacked as half2, HFMA2 dot products.

Reads the half2 layout of kernels/prepare.py (prepare_half2 / half2_from_prepared): every int32 word is two
16-bit lanes holding the two columns of one even/odd pair, so x read through an int32 pointer is already the
matching half2 and no x shuffle is needed.  For each 16-bit lane position p of a code (both lanes at once):

    v = (word & (7 << p) * 0x10001) | magic_p     magic_p = 2**e (e = 10 - p fp16, 7 - p bf16) in both lanes:
                                                   mantissa bit p is then worth 1, so v = 2**e + code exactly
    d = v + (-(2**e + zero))                       one HADD2: code - zero exactly (small integers)
    acc = fma(d, x_pair, acc)                      one HFMA2: two products, 16-bit accumulate

Per 32 weights (3 words): 3 shifts (fp16; 6 for bf16) + 18 LOP3, 16 HADD2, 16 HFMA2 per x row, and a flush of
the 16-bit accumulator into fp32 (2 conversions + 2 FADD, or an FFMA with the group's scale): the 16-bit
chain is only 16 products long (one block's run of a tile column), which keeps both the rounding (~2**-11 of
a 32-term partial sum) and the fp16 range (|x| * 7 * 16 < 65504 for |x| < 585, per lane and run) in check.
Per-channel scales multiply the fp32 row sum once; group scales (group_size % (32 Q) == 0, one scale per
tile element) multiply each flush.  Zeros are folded into the HADD2 operand: -(2**e + z) has z in its
mantissa at bit p, so it is (z | z << 16) * 2**p + const, one IMAD per code position (hoisted when per channel).
Grouped asymmetric grids instead subtract 2**e only and take z * sum(x) off at the flush: a per-element zero in
the HADD2 operand made triton move every x vector through shared memory (benchmarks/kernel_notes.md).

Tile: a program owns BN output rows (and BM <= 4 rows of x; grid axis 1 covers larger M) and walks K in steps
of BKB blocks of 32 Q columns: three [BN, Q * BKB] word tiles per step (one per role, 16-byte loads), the next
step's tiles loaded before this step's math.  Steps of whole blocks inside K load x without masks; one masked
tail step takes the rest.  Outliers are fused after the loop exactly as in gemv.py.

The f16x2 / bf16x2 arithmetic is inline PTX on CUDA (ASM); elsewhere (TRITON_INTERPRET=1 on CPU, or asm=False)
the same operations are emulated lane by lane in fp32 with one round to 16 bits per operation, which is what
the PTX instruction does (products of two 16-bit floats are exact in fp32).
"""
import os

import torch
import triton
import triton.language as tl

from quantease.errors import QuantEaseError
from quantease.kernels.prepare import half2_from_prepared, half2_supported

# (BN, blocks of 32 Q columns per K step, num_warps) by M; first guesses, to be swept on the H100
CONFIGS = {1: (16, 16, 8), 2: (16, 8, 4), 4: (16, 8, 4)}
BM_MAX = 4  # rows of x per program; more rows -> more programs along grid axis 1


def pick_config(m):
    return CONFIGS[1 if m == 1 else (2 if m == 2 else 4)]


GEMV_ENV = "QUANTEASE_GEMV"  # "half2": ops.py sends the GEMV rows here where supports(); "v1"/unset: gemv.py
GEMV_CHOICES = ("v1", "half2")


def selected():
    """The GEMV that $QUANTEASE_GEMV asks for ("v1" when unset)."""
    name = os.environ.get(GEMV_ENV, "v1") or "v1"
    if name not in GEMV_CHOICES:
        raise QuantEaseError(f"${GEMV_ENV}={name!r} is not one of {GEMV_CHOICES}")
    return name


def supports(p, x):
    """True when qgemv_half2 can run this prepared layer on this x (the dispatcher's test)."""
    return half2_supported(p["bits"], p["group_size"]) and x.dtype in (torch.float16, torch.bfloat16)


def cached_layout(p):
    """prepare_weights' dict -> the half2 dict, built once and kept on the plane0 tensor (the custom op rebuilds
    p from its tensors every call).  Both layouts then stay resident: an opt-in for measuring, not for serving
    -- a runtime that adopts v2 should call prepare_half2 at load time instead."""
    parts = (p["plane0"], p["plane1"], p["scales"], p["zeros"], p["outlier_idx"], p["outlier_val"])
    key = tuple((t.data_ptr(), t._version) if t is not None else None for t in parts) + (p["group_size"],)
    hit = getattr(p["plane0"], "_quantease_half2", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    p2 = half2_from_prepared(p)
    p["plane0"]._quantease_half2 = (key, p2)
    return p2


# ---- 16-bit pair arithmetic on int32 bit patterns (low lane = even column) ----

@triton.jit
def _lanes(h, BF16: tl.constexpr):
    """int32 half2 / bfloat162 bits -> (low, high) lanes as float32 (exact)."""
    if BF16:
        lo = (h << 16).to(tl.float32, bitcast=True)
        hi = (h & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((h >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _bits16(f, BF16: tl.constexpr):
    """float32 -> its 16-bit float's bits in the low half of an int32 (round to nearest even)."""
    if BF16:
        b = f.to(tl.int32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    else:
        return f.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _pack(lo, hi, BF16: tl.constexpr):
    return _bits16(lo, BF16) | (_bits16(hi, BF16) << 16)


@triton.jit
def _fma2(a, b, c, BF16: tl.constexpr, ASM: tl.constexpr):
    """a * b + c per lane, one rounding (HFMA2)."""
    if ASM:
        if BF16:
            return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        a0, a1 = _lanes(a, BF16)
        b0, b1 = _lanes(b, BF16)
        c0, c1 = _lanes(c, BF16)
        return _pack(a0 * b0 + c0, a1 * b1 + c1, BF16)


@triton.jit
def _add2(a, b, BF16: tl.constexpr, ASM: tl.constexpr):
    """a + b per lane (HADD2; bf16 as an FMA by 1.0, valid from sm_80)."""
    if ASM:
        if BF16:
            return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                             [a, tl.full(a.shape, 0x3F803F80, tl.int32), b],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("add.f16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        a0, a1 = _lanes(a, BF16)
        b0, b1 = _lanes(b, BF16)
        return _pack(a0 + b0, a1 + b1, BF16)


@triton.jit
def _or3(a, ma: tl.constexpr, b, mb: tl.constexpr, c, ASM: tl.constexpr):
    """(a & ma) | (b & mb) | c as two LOP3s (ptxas makes three of the plain expression, see gemv.py)."""
    if ASM:
        t = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                      [a, tl.full(a.shape, ma, tl.int32), c], dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [b, tl.full(a.shape, mb, tl.int32), t], dtype=tl.int32, is_pure=True,
                                         pack=1)
    else:
        return (a & ma) | (b & mb) | c


# ---- the unpack: slot s (0..15) of a 32-column run -> (v = 2**e + code in both lanes, p) ----

@triton.jit
def _magic(a, p: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """Code at bits p..p+2 of both lanes of a, in place, OR-ed into 2**e: one LOP3."""
    # 2**e's exponent field, e = (7 if BF16 else 10) - p, in both lanes
    m: tl.constexpr = (BF16 * ((134 - p) << 7) + (1 - BF16) * ((25 - p) << 10)) * 0x10001
    if ASM:  # (ptxas otherwise rematerializes one of the two constants with a MOV before every LOP3)
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [a, tl.full(a.shape, (7 << p) * 0x10001, tl.int32),
                                          tl.full(a.shape, m, tl.int32)], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return (a & ((7 << p) * 0x10001)) | m


@triton.jit
def _neg_mz(zz, p: tl.constexpr, BF16: tl.constexpr):
    """-(2**e + z) in both lanes from zz = z | z << 16 (z < 8 sits in the mantissa at bit p): one IMAD."""
    e: tl.constexpr = BF16 * ((134 - p) << 7) + (1 - BF16) * ((25 - p) << 10)  # 2**e's exponent field
    base: tl.constexpr = (0x8000 + e) * 0x10001 - (1 << 32)  # -(2**e) in both lanes, as a signed int32
    return zz * (1 << p) + base


@triton.jit
def _dq(v, zz, p: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """code - zero in both lanes, exact."""
    return _add2(v, _neg_mz(zz, p, BF16), BF16, ASM)


@triton.jit
def _xp(xw, off, KH, NO_MASK: tl.constexpr):
    """x pairs at pair offsets off [BKW] (int32 bits of two 16-bit floats); KH = K / 2 pairs."""
    if NO_MASK:
        return tl.load(xw + off)
    else:
        return tl.load(xw + off, mask=off < KH, other=0)


@triton.jit
def _slot(d, xw, off, KH, stride_xw, Mloc, a0, a1, a2, a3, s0, s1, s2, s3, BF16: tl.constexpr,
          ASM: tl.constexpr, BM: tl.constexpr, NO_MASK: tl.constexpr, XS: tl.constexpr):
    """acc_m = fma(d, x_m pairs, acc_m) for the BM rows of x (and s_m += x_m pairs when XS).  Rows past M re-read
    the last row (no row mask per element; their outputs are never stored)."""
    x = _xp(xw, off, KH, NO_MASK)
    a0 = _fma2(d, x[None, :], a0, BF16, ASM)
    if XS:
        s0 = _add2(s0, x, BF16, ASM)
    if BM > 1:
        x = _xp(xw + tl.minimum(Mloc - 1, 1) * stride_xw, off, KH, NO_MASK)
        a1 = _fma2(d, x[None, :], a1, BF16, ASM)
        if XS:
            s1 = _add2(s1, x, BF16, ASM)
    if BM > 2:
        x = _xp(xw + tl.minimum(Mloc - 1, 2) * stride_xw, off, KH, NO_MASK)
        a2 = _fma2(d, x[None, :], a2, BF16, ASM)
        if XS:
            s2 = _add2(s2, x, BF16, ASM)
        x = _xp(xw + tl.minimum(Mloc - 1, 3) * stride_xw, off, KH, NO_MASK)
        a3 = _fma2(d, x[None, :], a3, BF16, ASM)
        if XS:
            s3 = _add2(s3, x, BF16, ASM)
    return a0, a1, a2, a3, s0, s1, s2, s3


@triton.jit
def _code(src, p: tl.constexpr, slot: tl.constexpr, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2, a3, s0, s1, s2, s3,
          BF16: tl.constexpr, ASM: tl.constexpr, BM: tl.constexpr, NO_MASK: tl.constexpr, Q: tl.constexpr,
          XS: tl.constexpr):
    """Pair slot `slot` (x pairs xoff + slot * Q), whose codes sit at bits p..p+2 of src's lanes."""
    d = _dq(_magic(src, p, BF16, ASM), zz, p, BF16, ASM)
    return _slot(d, xw, xoff + slot * Q, KH, stride_xw, Mloc, a0, a1, a2, a3, s0, s1, s2, s3, BF16, ASM, BM,
                 NO_MASK, XS)


@triton.jit
def _run(w0, w1, w2, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2, a3, s0, s1, s2, s3,
         BF16: tl.constexpr, ASM: tl.constexpr, BM: tl.constexpr, NO_MASK: tl.constexpr, Q: tl.constexpr,
         XS: tl.constexpr):
    """All 16 pair slots of the step's word tiles w0, w1, w2 (roles 0, 1, 2) into the 16-bit accumulators."""
    # fp16 (10-bit mantissa): slots 0-2 in place (p = 0, 3, 6); w >> (9 - r) brings slots 3, 4 to p = r, r + 3
    # and the spare bit to 6 + r, so the spare code is built in place at p = 6.
    # bf16 (7-bit mantissa): slots 0, 1 in place (p = 0, 3); w >> 6 brings slots 2, 3 to p = 0, 3;
    # w >> (12 - r) brings slot 4 to p = r and the spare bit to 3 + r: spare code at p = 3.
    for r in tl.static_range(3):
        if r == 0:
            w = w0
        elif r == 1:
            w = w1
        else:
            w = w2
        if BF16:
            u = w >> 6
            t = w >> (12 - r)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(w, 0, 5 * r, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2, a3,
                                                   s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(w, 3, 5 * r + 1, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2,
                                                   a3, s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(u, 0, 5 * r + 2, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2,
                                                   a3, s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(u, 3, 5 * r + 3, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2,
                                                   a3, s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(t, r, 5 * r + 4, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2,
                                                   a3, s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
        else:
            t = w >> (9 - r)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(w, 0, 5 * r, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2, a3,
                                                   s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(w, 3, 5 * r + 1, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2,
                                                   a3, s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(w, 6, 5 * r + 2, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2,
                                                   a3, s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(t, r, 5 * r + 3, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1, a2,
                                                   a3, s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
            a0, a1, a2, a3, s0, s1, s2, s3 = _code(t, r + 3, 5 * r + 4, zz, xw, xoff, KH, stride_xw, Mloc, a0, a1,
                                                   a2, a3, s0, s1, s2, s3, BF16, ASM, BM, NO_MASK, Q, XS)
        if r == 0:
            t0 = t
        elif r == 1:
            t1 = t
        else:
            t2 = t
    PS: tl.constexpr = 6 - 3 * BF16  # the spare code's position (6 fp16, 3 bf16): its bit r is bit PS + r of t_r
    m: tl.constexpr = (BF16 * ((134 - PS) << 7) + (1 - BF16) * ((25 - PS) << 10)) * 0x10001  # 2**e, as _magic
    v = _or3(t1, (2 << PS) * 0x10001, t2, (4 << PS) * 0x10001, (t0 & ((1 << PS) * 0x10001)) | m, ASM)
    d = _dq(v, zz, PS, BF16, ASM)
    return _slot(d, xw, xoff + 15 * Q, KH, stride_xw, Mloc, a0, a1, a2, a3, s0, s1, s2, s3, BF16, ASM, BM,
                 NO_MASK, XS)


@triton.jit
def _flush(yacc, acc, s_e, z_e, xs, BF16: tl.constexpr, GROUPED: tl.constexpr, XS: tl.constexpr):
    """fp32 accumulator += both 16-bit lanes of acc (times the group scale when grouped; minus zero * x-sum when
    the zero was left out of the unpack)."""
    lo, hi = _lanes(acc, BF16)
    if XS:
        x0, x1 = _lanes(xs, BF16)
        return yacc + s_e * ((lo + hi) - z_e * (x0 + x1)[None, :])
    elif GROUPED:
        return yacc + s_e * (lo + hi)
    else:
        return yacc + (lo + hi)


@triton.jit
def _words(w_row, t, mask_n, blk, NBLK, SW: tl.constexpr, Q: tl.constexpr, BKB: tl.constexpr):
    """Step t's three [BN, Q * BKB] word tiles (roles 0, 1, 2); blocks past the row's end read as 0."""
    m = mask_n[:, None] & (t * BKB + blk < NBLK)[None, :]
    row = w_row + t * SW
    return (tl.load(row, mask=m, other=0, eviction_policy="evict_first"),
            tl.load(row + Q, mask=m, other=0, eviction_policy="evict_first"),
            tl.load(row + 2 * Q, mask=m, other=0, eviction_policy="evict_first"))


@triton.jit
def _step(t, w0, w1, w2, zz, y0, y1, y2, y3, zero_acc, xw, xcol, KH, stride_xw, Mloc,
          s_ptr, z_ptr, offs_n, mask_n, blk, NBLK, stride_s, stride_z,
          BF16: tl.constexpr, ASM: tl.constexpr, BM: tl.constexpr, NO_MASK: tl.constexpr, Q: tl.constexpr,
          BKB: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZEROS: tl.constexpr, GB: tl.constexpr):
    """One K step: 16-bit dot products of the step's words, flushed into the fp32 accumulators y0..y3."""
    xoff = t * (16 * Q * BKB) + xcol
    s_e = tl.full((1, 1), 1.0, tl.float32)
    z_e = tl.full((1, 1), 0.0, tl.float32)
    if not PER_CHANNEL:  # one group per tile element (group_size % (32 Q) == 0)
        g = (t * BKB + blk) // GB
        gmask = mask_n[:, None] & (t * BKB + blk < NBLK)[None, :]
        s_e = tl.load(s_ptr + offs_n[:, None] * stride_s + g[None, :], mask=gmask, other=0.0).to(tl.float32)
        if HAS_ZEROS:  # the unpack subtracts 2**e only (zz = 0); the flush takes z * sum(x) off in fp32
            z_e = tl.load(z_ptr + offs_n[:, None] * stride_z + g[None, :], mask=gmask, other=0).to(tl.float32)
    XS: tl.constexpr = HAS_ZEROS and not PER_CHANNEL
    zs = tl.zeros(xcol.shape, dtype=tl.int32)  # +0.0 pairs: the x-sum accumulators
    a0, a1, a2, a3, s0, s1, s2, s3 = _run(w0, w1, w2, zz, xw, xoff, KH, stride_xw, Mloc,
                                          zero_acc, zero_acc, zero_acc, zero_acc, zs, zs, zs, zs,
                                          BF16, ASM, BM, NO_MASK, Q, XS)
    y0 = _flush(y0, a0, s_e, z_e, s0, BF16, not PER_CHANNEL, XS)
    if BM > 1:
        y1 = _flush(y1, a1, s_e, z_e, s1, BF16, not PER_CHANNEL, XS)
    if BM > 2:
        y2 = _flush(y2, a2, s_e, z_e, s2, BF16, not PER_CHANNEL, XS)
        y3 = _flush(y3, a3, s_e, z_e, s3, BF16, not PER_CHANNEL, XS)
    return y0, y1, y2, y3


@triton.jit
def _finish_row(yacc, y_ptr, m, Mloc, s, offs_n, mask_n, bias, x_ptr, oi_ptr, ov_ptr, R, stride_oi, stride_ov,
                PER_CHANNEL: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, BR: tl.constexpr):
    y = tl.sum(yacc, axis=1)
    if PER_CHANNEL:
        y = s * y
    if HAS_OUTLIERS:  # R slots per row; every program gathers the same number of x values (balanced)
        for r0 in range(0, R, BR):
            offs_r = r0 + tl.arange(0, BR)
            rmask = mask_n[:, None] & (offs_r[None, :] < R)
            idx = tl.load(oi_ptr + offs_n[:, None] * stride_oi + offs_r[None, :], mask=rmask, other=0)
            val = tl.load(ov_ptr + offs_n[:, None] * stride_ov + offs_r[None, :], mask=rmask, other=0.0)
            xg = tl.load(x_ptr + idx.to(tl.int32), mask=rmask & (offs_r[None, :] * 0 + m < Mloc), other=0.0)
            y += tl.sum(xg.to(tl.float32) * val.to(tl.float32), axis=1)
    if HAS_BIAS:
        y += bias
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n & (offs_n * 0 + m < Mloc))


@triton.jit
def qgemv_half2_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, oi_ptr, ov_ptr, b_ptr,
                       M, N, K, R, NBLK,
                       stride_xm, stride_ym, stride_w, stride_s, stride_z, stride_oi, stride_ov,
                       BF16: tl.constexpr, ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                       HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                       PREFETCH: tl.constexpr,
                       Q: tl.constexpr, GB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr,
                       BR: tl.constexpr):
    BKW: tl.constexpr = Q * BKB  # words per role per step per row
    pid_n = tl.program_id(0)
    row0 = tl.program_id(1) * BM
    x_ptr += row0 * stride_xm
    y_ptr += row0 * stride_ym
    Mloc = M - row0
    KH = K // 2
    xw = x_ptr.to(tl.pointer_type(tl.int32))  # x pairs: K is even and rows 4-byte aligned (the wrapper)
    stride_xw = stride_xm // 2
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    w = tl.arange(0, BKW)
    blk = w // Q  # block of each tile column within the step
    wcol = w + blk * (2 * Q)  # role-0 word of tile column w, from the step's first word
    xcol = w + blk * (15 * Q)  # x pair of its slot 0, from the step's first pair
    w_row = w_ptr + offs_n[:, None] * stride_w + wcol[None, :]
    zero_acc = tl.zeros((BN, BKW), dtype=tl.int32)  # +0.0 in both lanes
    y0 = tl.zeros((BN, BKW), dtype=tl.float32)
    y1 = tl.zeros((BN, BKW), dtype=tl.float32)
    y2 = tl.zeros((BN, BKW), dtype=tl.float32)
    y3 = tl.zeros((BN, BKW), dtype=tl.float32)
    zz = tl.full((1, 1), (1 - HAS_ZEROS) * ZERO * 0x10001, tl.int32)  # z | z << 16 (grouped zeros: 0, see _step)
    if HAS_ZEROS and PER_CHANNEL:
        z = tl.load(z_ptr + offs_n * stride_z, mask=mask_n, other=0).to(tl.int32)
        zz = (z | (z << 16))[:, None]
    SW: tl.constexpr = 3 * Q * BKB  # words per step per row
    steps = tl.cdiv(NBLK, BKB)
    full = (K // (32 * Q)) // BKB  # steps of whole blocks inside K: their x loads need no mask
    wmask = mask_n[:, None] & (blk < NBLK)[None, :]
    # weights are read once: evict_first keeps x and the outlier tables in L2
    n0 = tl.load(w_row, mask=wmask, other=0, eviction_policy="evict_first")
    n1 = tl.load(w_row + Q, mask=wmask, other=0, eviction_policy="evict_first")
    n2 = tl.load(w_row + 2 * Q, mask=wmask, other=0, eviction_policy="evict_first")
    for t in range(0, full):
        if PREFETCH:  # this step's words were loaded last step; issue the next step's before the math
            w0, w1, w2 = n0, n1, n2
            n0, n1, n2 = _words(w_row, t + 1, mask_n, blk, NBLK, SW, Q, BKB)
        else:
            w0, w1, w2 = _words(w_row, t, mask_n, blk, NBLK, SW, Q, BKB)
        y0, y1, y2, y3 = _step(t, w0, w1, w2, zz, y0, y1, y2, y3, zero_acc, xw, xcol, KH, stride_xw, Mloc,
                               s_ptr, z_ptr, offs_n, mask_n, blk, NBLK, stride_s, stride_z,
                               BF16, ASM, BM, True, Q, BKB, PER_CHANNEL, HAS_ZEROS, GB)
    if full < steps:  # the last step holds a partial block (or fewer than BKB blocks): masked x loads
        if PREFETCH:
            w0, w1, w2 = n0, n1, n2
        else:
            w0, w1, w2 = _words(w_row, full, mask_n, blk, NBLK, SW, Q, BKB)
        y0, y1, y2, y3 = _step(full, w0, w1, w2, zz, y0, y1, y2, y3, zero_acc, xw, xcol, KH, stride_xw, Mloc,
                               s_ptr, z_ptr, offs_n, mask_n, blk, NBLK, stride_s, stride_z,
                               BF16, ASM, BM, False, Q, BKB, PER_CHANNEL, HAS_ZEROS, GB)
    s = tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _finish_row(y0, y_ptr, 0, Mloc, s, offs_n, mask_n, bias, x_ptr, oi_ptr, ov_ptr, R, stride_oi, stride_ov,
                PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BR)
    if BM > 1:
        _finish_row(y1, y_ptr + stride_ym, 1, Mloc, s, offs_n, mask_n, bias, x_ptr + stride_xm, oi_ptr, ov_ptr,
                    R, stride_oi, stride_ov, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BR)
    if BM > 2:
        _finish_row(y2, y_ptr + 2 * stride_ym, 2, Mloc, s, offs_n, mask_n, bias, x_ptr + 2 * stride_xm, oi_ptr,
                    ov_ptr, R, stride_oi, stride_ov, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BR)
        _finish_row(y3, y_ptr + 3 * stride_ym, 3, Mloc, s, offs_n, mask_n, bias, x_ptr + 3 * stride_xm, oi_ptr,
                    ov_ptr, R, stride_oi, stride_ov, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BR)


def _pairs_ready(x):
    """x with an even row length, even row stride and a 4-byte aligned base (int32 pair loads); copies (and
    zero-pads one column) only when x is not already so -- never for an even K, contiguous activation."""
    m, k = x.shape
    if k % 2 == 0 and x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0:
        return x
    xp = torch.zeros(m, k + k % 2, dtype=x.dtype, device=x.device)
    xp[:, :k] = x
    return xp


def qgemv_half2(x, p, bias, out, config=None, asm=True, prefetch=True):
    """x [M, K] fp16/bf16, prepare_half2's dict p, bias [N] | None, out [M, N] -> out.  Any M (rows of x are
    split into programs of <= 4); meant for M <= ops.GEMV_MAX_M."""
    if "words" not in p:
        raise QuantEaseError("qgemv_half2 needs prepare_half2's layout (got a dict without 'words')")
    if not half2_supported(p["bits"], p["group_size"]):
        raise QuantEaseError(f"the half2 GEMV takes 3-bit codes, per channel or groups of a multiple of 32 "
                             f"columns; got bits={p['bits']}, group_size={p['group_size']}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise QuantEaseError(f"the half2 GEMV takes float16/bfloat16 activations, got {x.dtype}")
    m, k = x.shape
    n = p["out_features"]
    if k != p["in_features"]:
        raise QuantEaseError(f"x has {k} input features, the layer has {p['in_features']}")
    if m == 0:
        return out
    xq = _pairs_ready(x)
    bn, bkb, warps = config or pick_config(m)
    bm = 1 if m == 1 else (2 if m == 2 else BM_MAX)
    q = p["q"]
    words, zeros, oi, ov = p["words"], p["zeros"], p["outlier_idx"], p["outlier_val"]
    nblk = words.shape[1] // (3 * q)
    has_out = oi is not None
    r = oi.shape[1] if has_out else 0
    br = max(2, min(32, triton.next_power_of_2(max(r, 1))))
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    qgemv_half2_kernel[grid](
        xq, out, words, p["scales"], zeros if zeros is not None else p["scales"],
        oi if has_out else words, ov if has_out else p["scales"], bias if bias is not None else p["scales"],
        m, n, xq.shape[1], r, nblk,
        xq.stride(0), out.stride(0), words.stride(0), p["scales"].stride(0),
        zeros.stride(0) if zeros is not None else 0, oi.stride(0) if has_out else 0, ov.stride(0) if has_out else 0,
        BF16=x.dtype == torch.bfloat16, ZERO=2 ** (p["bits"] - 1), HAS_ZEROS=zeros is not None,
        PER_CHANNEL=p["group_size"] == -1, HAS_OUTLIERS=has_out, HAS_BIAS=bias is not None,
        ASM=x.is_cuda and asm, PREFETCH=prefetch,
        Q=q, GB=max(1, p["group_size"] // (32 * q)),  # blocks per group (1 for groups of 32, 64, 128)
        BM=bm, BN=bn, BKB=bkb, BR=br, num_warps=warps)
    return out
