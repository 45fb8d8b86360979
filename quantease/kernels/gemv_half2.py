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

Tile: a program owns BN output rows (and BM <= 4 rows of x; more rows -> M / BM adjacent programs per row block) and walks K in steps
of BKB blocks of 32 Q columns: three [BN, Q * BKB] word tiles per step (one per role, 16-byte loads), the next
step's tiles (or the next two: prefetch depth 2) loaded before this step's math.  Steps of whole blocks inside K
load x without masks; one masked tail step takes the rest.  Outliers are fused as in gemv.py, except that the
first 32 slots of each row are loaded before the loop (their latency hides under it) where registers allow.

The f16x2 / bf16x2 arithmetic is inline PTX on CUDA (ASM); elsewhere (TRITON_INTERPRET=1 on CPU, or asm=False)
the same operations are emulated lane by lane in fp32 with one round to 16 bits per operation, which is what
the PTX instruction does (products of two 16-bit floats are exact in fp32).
"""
import os

import torch
import triton
import triton.language as tl

from quantease.errors import QuantEaseError
from quantease.kernels import pdl, xprefetch
from quantease.kernels.prepare import half2_from_prepared, half2_supported, half2_words_per_role, has_q8_words
from quantease.kernels.gemv import ell_rows

# Configs: (BN, blocks of 32 Q columns per K step, num_warps[, stages[, prefetch depth[, lead[, pin[, cg[, xhint
# [, pipe[, nreg]]]]]]]]);
# stages default 3 (triton's default: no effect here, the loads are register-prefetched), prefetch depth 1 (the
# next step's words are loaded before this step's math -- in the source: ptxas sinks them to ~70% of the step's
# SASS unless pin), lead 0 (no cache hints; else L2 prefetch of step t + lead at the loop's top), pin False (a
# barrier after each step's register loads keeps them at the top: 158 -> 252 registers at (8, 16, 1)), cg False
# (weights through L1), xhint False (no L1 prefetch of the next step's x), pipe 1 (no cp.async pipeline; > 1 with
# prefetch 0: the loop's loads go to shared memory pipe - 1 steps ahead), nreg 0 (ptxas' register count; else a
# cap, CUDA only); see qgemv_half2.
# Chosen ahead per shape from the H100 sweep (benchmarks/gemv_sweep.py,
# benchmarks/results/kernels_gemv.md); no autotuning at call time (CUDA-graph capture, torch.compile).
#   M = 1: 1-warp programs of 8 rows x 16 blocks (2048 columns per step for Q = 4) were best or within 4% on 8 of
#   the 9 shapes; long N (>= 16384, 28672 x 4096 / 8192) wants narrower steps (32, 4, 1): 40.5 vs 42.1 us; a K
#   that is not a whole number of 16-block steps (4096 x 11008: 86 blocks) pays a masked tail step on 1/6 of K:
#   (8, 32, 4) 11.0 vs (8, 16, 1) 14.5 us.
#   M = 2: 1-warp programs of 8 rows x 8 blocks, loop software-pipelined 3 deep (H200, gemv_sweep --pipe,
#   results/kernels_gemv.md): 4096 x 4096 8.7 vs 11.3 us for the old (8, 16, 2), 4096 x 14336 21.7 vs 33.5, 8192^2
#   24.6 vs 26.0; long N (>= 10000) keeps (16, 4, 1) (28672 x 8192: 70.3 vs 76.8 pipelined); ragged K (32, 16, 8)
#   (14.8 vs 18.1 us on the H100; not re-measured pipelined).  At M = 1 the pipelined loop lost on every shape
#   (8192^2 16.1-20.5 vs 13.1 us).
#   M >= 3: not tuned (ops.py sends M >= 3 to the tensor-core GEMM); the most frequent M = 4 winner.
BM_MAX = 4  # rows of x per program; more rows -> more programs per row block
M2_PIPELINED = (8, 8, 1, 3, 0, 0, False, False, False, 3)  # prefetch 0, pipe 3
LONG_N_M1, LONG_N_M2 = 16384, 10000


def pick_config(m, n=None, k=None, q=8):
    """The table above: config for M rows of x on an N x K layer (q words per role per block; n/k None: the
    8192 x 8192 choice).  The table was measured at q = 4; at q = 8 (blocks of 256 columns) a step of half the
    blocks reads the same words per role and row, in runs twice as long."""
    per = 2 if q == 8 else 1  # q = 4 table blocks per block of this q (256 columns at q = 8)
    ragged = k is not None and triton.cdiv(k, 32 * q) % (16 // per) != 0  # K not a whole number of 2048 columns
    long_n = n is not None and k is not None and k <= 8192
    if m == 1:
        if ragged:
            cfg = (8, 32, 4)
        else:
            cfg = (32, 4, 1) if long_n and n >= LONG_N_M1 else (8, 16, 1)
    elif m == 2:
        if ragged:
            cfg = (32, 16, 8)
        else:
            cfg = (16, 4, 1) if long_n and n >= LONG_N_M2 else M2_PIPELINED
    else:
        cfg = (8, 16, 2)
    return (cfg[0], cfg[1] // per) + tuple(cfg[2:])


GEMV_ENV = "QUANTEASE_GEMV"  # "half2" (default): ops.py sends the GEMV rows here where supports(); "v1": gemv.py
GEMV_CHOICES = ("v1", "half2")


def selected():
    """The GEMV that $QUANTEASE_GEMV asks for ("half2" when unset: 1.08-1.67x faster than v1 at M = 1 on all nine sweep shapes,
    benchmarks/results/kernels_gemv.md)."""
    name = os.environ.get(GEMV_ENV, "half2") or "half2"
    if name not in GEMV_CHOICES:
        raise QuantEaseError(f"${GEMV_ENV}={name!r} is not one of {GEMV_CHOICES}")
    return name


def supports(p, x):
    """True when qgemv_half2 can run this prepared layer on this x (the dispatcher's test)."""
    return half2_supported(p["bits"], p["group_size"]) and x.dtype in (torch.float16, torch.bfloat16)


def add_layout(p, codes=None):
    """Load time: prepare_weights' dict p gains the half2 words (key "words"; None where the half2 GEMV does not
    apply), built once here, eagerly, so that a runtime can keep them as a buffer / parameter beside the planes
    (seen by vLLM's memory profiling, never built inside a CUDA-graph capture).  Where the words are at Q = 8
    (per channel, groups of a multiple of 256) the batched-decode GEMM (gemm_half2.py) reads them too, and the
    zeros become int16 (that kernel's requirement; every other kernel loads either).  codes: the integer codes
    when at hand (prepare_weights), else read back from the planes.  Returns p."""
    if p.get("words") is not None:  # already there (prepare_weights on CUDA); the planes may be gone
        return p
    p["words"] = half2_from_prepared(p, codes)["words"] if half2_supported(p["bits"], p["group_size"]) else None
    if has_q8_words(p) and p["zeros"] is not None:
        p["zeros"] = p["zeros"].to(torch.int16)  # gemm_half2 reads the same words; it needs 16-bit zeros
    return p


def cached_layout(p):
    """The half2 dict for prepare_weights' dict p: p itself (plus q) when it carries "words" (add_layout at load
    time: the production path), else built on first use and kept on the plane0 tensor (the custom op rebuilds p
    from its tensors every call) -- a hidden second copy that appears only at the first decode step: tests and
    benchmarks only."""
    if p.get("words") is not None:
        return dict(p, q=half2_words_per_role(p["group_size"]))
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
def _words(w_row, t, mask_n, blk, NBLK, SW: tl.constexpr, Q: tl.constexpr, BKB: tl.constexpr, CG: tl.constexpr):
    """Step t's three [BN, Q * BKB] word tiles (roles 0, 1, 2); blocks past the row's end read as 0.  CG: the
    words skip L1 (ld.global.cg), so the streamed weights cannot evict x from it."""
    m = mask_n[:, None] & (t * BKB + blk < NBLK)[None, :]
    row = w_row + t * SW
    if CG:
        return (tl.load(row, mask=m, other=0, cache_modifier=".cg"),
                tl.load(row + Q, mask=m, other=0, cache_modifier=".cg"),
                tl.load(row + 2 * Q, mask=m, other=0, cache_modifier=".cg"))
    else:
        return (tl.load(row, mask=m, other=0, eviction_policy="evict_first"),
                tl.load(row + Q, mask=m, other=0, eviction_policy="evict_first"),
                tl.load(row + 2 * Q, mask=m, other=0, eviction_policy="evict_first"))


@triton.jit
def _xhint(xw, t, KH, stride_xw, Mloc, PW: tl.constexpr, XL: tl.constexpr, BM: tl.constexpr):
    """L1 prefetch of step t's x pairs (PW pairs per row from pair t * PW; XL lines of 32 pairs, clamped to K) for
    the BM rows: the step's x loads then hit L1 instead of waiting behind the weights' DRAM traffic for L2."""
    off = tl.minimum(t * PW + tl.arange(0, XL) * 32, KH - 1)
    for r in tl.static_range(BM):
        addr = (xw + tl.minimum(Mloc - 1, r) * stride_xw + off).to(tl.int64, bitcast=True)
        tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.b32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _hint(w_ptr, offs_n, N, stride_w, t, SW: tl.constexpr, LINES: tl.constexpr, LEVEL: tl.constexpr):
    """Cache prefetch (no registers: ptxas cannot sink it) of step t's [BN, SW] words: one per 128-byte line of
    each row's run of the step (LINES = next power of 2 of its lines + 1; the last element covers the run's end),
    rows past N clamped to N - 1.  Only for steps inside K (the caller's test).  LEVEL 2: into L2, 1: into L1."""
    rows = tl.minimum(offs_n, N - 1)
    off = tl.minimum(tl.arange(0, LINES) * 32, SW - 1)  # words: 32 = one 128-byte line
    addr = (w_ptr + rows[:, None] * stride_w + t * SW + off[None, :]).to(tl.int64, bitcast=True)
    if LEVEL == 1:
        tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.b32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                                  is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.b32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                                  is_pure=False, pack=1)


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
def _outlier_slots(oi_ptr, ov_ptr, offs_n, mask_n, offs_r, R, stride_oi, stride_ov):
    """Outlier slots offs_r (those < R) of each row: (index, value, mask).  The early slots (0 .. BR - 1) are issued
    before the K loop so that their latency hides under it (loaded after the loop, the index -> x gather -> sum chain
    was exposed: +11-14% at 4096 rows); loop_outliers' are issued a step ahead."""
    rmask = mask_n[:, None] & (offs_r[None, :] < R)
    idx = tl.load(oi_ptr + offs_n[:, None] * stride_oi + offs_r[None, :], mask=rmask, other=0)
    val = tl.load(ov_ptr + offs_n[:, None] * stride_ov + offs_r[None, :], mask=rmask, other=0.0)
    return idx, val, rmask


@triton.jit
def _finish_row(yacc, y_ptr, m, Mloc, s, offs_n, mask_n, bias, x_ptr, oi_ptr, ov_ptr, R, stride_oi, stride_ov,
                idx0, val0, PER_CHANNEL: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
                BR: tl.constexpr, EARLY: tl.constexpr, oacc=None, done=0):
    """Row m's output: the scaled sum, the outlier slots from `done` on (oacc: the sum of those before it, added
    inside the K loop), the bias."""
    y = tl.sum(yacc, axis=1)
    if PER_CHANNEL:
        y = s * y
    if HAS_OUTLIERS:  # R slots per row; every program gathers the same number of x values (balanced)
        if oacc is not None:
            y += oacc
        start = done
        if EARLY:  # slots 0..BR-1 were loaded before the loop (idx0, val0): only the x gather is left
            offs_r = tl.arange(0, BR)
            rmask = mask_n[:, None] & (offs_r[None, :] < R)
            xg = tl.load(x_ptr + idx0.to(tl.int32), mask=rmask & (offs_r[None, :] * 0 + m < Mloc), other=0.0)
            y += tl.sum(xg.to(tl.float32) * val0.to(tl.float32), axis=1)
            start = BR
        y = ell_rows(y, x_ptr, oi_ptr, ov_ptr, offs_n, mask_n, start, R, stride_oi, stride_ov, m, Mloc, BR)
    if HAS_BIAS:
        y += bias
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n & (offs_n * 0 + m < Mloc))


@triton.jit
def qgemv_half2_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, oi_ptr, ov_ptr, b_ptr,
                       M, N, K, R, NBLK,
                       stride_xm, stride_ym, stride_w, stride_s, stride_z, stride_oi, stride_ov,
                       xlast, xa0, xn0, xa1, xn1, xa2, xn2, xa3, xn3,
                       BF16: tl.constexpr, ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                       HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                       PREFETCH: tl.constexpr, EARLY: tl.constexpr, LEAD: tl.constexpr, LEVEL: tl.constexpr,
                       LINES: tl.constexpr, PIN: tl.constexpr, CG: tl.constexpr, XHINT: tl.constexpr,
                       XL: tl.constexpr, PIPE: tl.constexpr, PDL: tl.constexpr,
                       Q: tl.constexpr, GB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr,
                       BR: tl.constexpr, ILR: tl.constexpr,
                       XPF: tl.constexpr, XPF_N: tl.constexpr, XPF_LANES: tl.constexpr):
    BKW: tl.constexpr = Q * BKB  # words per role per step per row
    pdl.start(PDL)  # the next kernel may launch once every program got here; it takes only the slots left free
    # programs of one row block (all M / BM of them) are adjacent in launch order: for M > BM the later ones
    # read the weight tile from L2, not HBM (a second grid axis re-streamed the whole weight per row group)
    MB = tl.cdiv(M, BM)
    pid_n = tl.program_id(0) // MB
    row0 = (tl.program_id(0) % MB) * BM
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
    # weights are read once: evict_first keeps x and the outlier tables in L2
    if PREFETCH >= 1:  # step 0's words (PREFETCH = 2: and step 1's) before anything else
        n0, n1, n2 = _words(w_row, 0, mask_n, blk, NBLK, SW, Q, BKB, CG)
    if PREFETCH >= 2:
        p0, p1, p2 = _words(w_row, 1, mask_n, blk, NBLK, SW, Q, BKB, CG)
    if LEAD > 0:  # cache hints for steps PREFETCH .. LEAD - 1 (the loop hints step t + LEAD from its top)
        for h in tl.static_range(PREFETCH, LEAD):
            if h < full:
                _hint(w_ptr, offs_n, N, stride_w, h, SW, LINES, LEVEL)
    idx0 = tl.zeros((BN, BR), dtype=tl.int32)
    val0 = tl.zeros((BN, BR), dtype=tl.float32)
    if HAS_OUTLIERS and EARLY:
        idx0, val0, _ = _outlier_slots(oi_ptr, ov_ptr, offs_n, mask_n, tl.arange(0, BR), R, stride_oi, stride_ov)
    oacc, done = None, 0
    if ILR > 0:  # M = 1: ILR outlier slots per K step inside the loop (indices one step ahead), the rest after it
        done = min(full * ILR, R)
        offs_ri = tl.arange(0, ILR)
        ri_idx, ri_val, ri_mask = _outlier_slots(oi_ptr, ov_ptr, offs_n, mask_n, offs_ri, R, stride_oi, stride_ov)
        oacc = tl.zeros((BN,), dtype=tl.float32)
    # everything above reads only this layer's tensors (zeros, the first words, outlier slots); x and y after this
    pdl.wait(PDL)
    if XHINT:
        _xhint(xw, 0, KH, stride_xw, Mloc, 16 * Q * BKB, XL, BM)
    # PIPE > 1 (with PREFETCH 0): triton's software pipeliner issues the loads of step t + PIPE - 1 as cp.async
    # copies into shared memory at step t's top -- bytes in flight without registers, and ptxas cannot sink them
    for t in tl.range(0, full, num_stages=PIPE):
        if LEAD > 0:  # ptxas sinks the register prefetch below most of the step's math (register pressure);
            if t + LEAD < full:  # a cache hint holds no register, so it stays at the top and DRAM starts early
                _hint(w_ptr, offs_n, N, stride_w, t + LEAD, SW, LINES, LEVEL)
        if XHINT:  # the next step's x into L1 (the last step's hint is clamped to K: harmless)
            _xhint(xw, t + 1, KH, stride_xw, Mloc, 16 * Q * BKB, XL, BM)
        if PREFETCH >= 2:  # loaded two steps ago; issue step t + 2's before the math
            w0, w1, w2 = n0, n1, n2
            n0, n1, n2 = p0, p1, p2
            p0, p1, p2 = _words(w_row, t + 2, mask_n, blk, NBLK, SW, Q, BKB, CG)
        elif PREFETCH == 1:  # this step's words were loaded last step; issue the next step's before the math
            w0, w1, w2 = n0, n1, n2
            n0, n1, n2 = _words(w_row, t + 1, mask_n, blk, NBLK, SW, Q, BKB, CG)
        else:
            w0, w1, w2 = _words(w_row, t, mask_n, blk, NBLK, SW, Q, BKB, CG)
        if ILR > 0:  # this step's gathers (x is L1 / L2 resident) and the next step's slot indices
            xg = tl.load(x_ptr + ri_idx.to(tl.int32), mask=ri_mask, other=0.0)
            vg = ri_val
            offs_ri += ILR
            ri_idx, ri_val, ri_mask = _outlier_slots(oi_ptr, ov_ptr, offs_n, mask_n, offs_ri, R, stride_oi,
                                                     stride_ov)
        if PIN:  # a barrier between the loads and the math: ptxas cannot move the loads below it
            tl.debug_barrier()
        y0, y1, y2, y3 = _step(t, w0, w1, w2, zz, y0, y1, y2, y3, zero_acc, xw, xcol, KH, stride_xw, Mloc,
                               s_ptr, z_ptr, offs_n, mask_n, blk, NBLK, stride_s, stride_z,
                               BF16, ASM, BM, True, Q, BKB, PER_CHANNEL, HAS_ZEROS, GB)
        if ILR > 0:
            oacc += tl.sum(xg.to(tl.float32) * vg.to(tl.float32), axis=1)
    if full < steps:  # the last step holds a partial block (or fewer than BKB blocks): masked x loads
        if PREFETCH >= 1:
            w0, w1, w2 = n0, n1, n2
        else:
            w0, w1, w2 = _words(w_row, full, mask_n, blk, NBLK, SW, Q, BKB, CG)
        y0, y1, y2, y3 = _step(full, w0, w1, w2, zz, y0, y1, y2, y3, zero_acc, xw, xcol, KH, stride_xw, Mloc,
                               s_ptr, z_ptr, offs_n, mask_n, blk, NBLK, stride_s, stride_z,
                               BF16, ASM, BM, False, Q, BKB, PER_CHANNEL, HAS_ZEROS, GB)
    pdl.start_late(PDL)  # mode LATE: the next kernel's programs overlap only this one's epilogue and store
    s = tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _finish_row(y0, y_ptr, 0, Mloc, s, offs_n, mask_n, bias, x_ptr, oi_ptr, ov_ptr, R, stride_oi, stride_ov,
                idx0, val0, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BR, EARLY, oacc, done)
    if BM > 1:
        _finish_row(y1, y_ptr + stride_ym, 1, Mloc, s, offs_n, mask_n, bias, x_ptr + stride_xm, oi_ptr, ov_ptr,
                    R, stride_oi, stride_ov, idx0, val0, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BR, EARLY)
    if BM > 2:
        _finish_row(y2, y_ptr + 2 * stride_ym, 2, Mloc, s, offs_n, mask_n, bias, x_ptr + 2 * stride_xm, oi_ptr,
                    ov_ptr, R, stride_oi, stride_ov, idx0, val0, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BR, EARLY)
        _finish_row(y3, y_ptr + 3 * stride_ym, 3, Mloc, s, offs_n, mask_n, bias, x_ptr + 3 * stride_xm, oi_ptr,
                    ov_ptr, R, stride_oi, stride_ov, idx0, val0, PER_CHANNEL, HAS_OUTLIERS, HAS_BIAS, BR, EARLY)
    # the next layers' words on their way into L2 while the kernels between run (kernels/xprefetch.py)
    xprefetch.tail(tl.program_id(0), tl.num_programs(0), xlast, xa0, xn0, xa1, xn1, xa2, xn2, xa3, xn3,
                   XPF, XPF_N, XPF_LANES)


def _pairs_ready(x):
    """x with an even row length, even row stride and a 4-byte aligned base (int32 pair loads); copies (and
    zero-pads one column) only when x is not already so -- never for an even K, contiguous activation."""
    m, k = x.shape
    if k % 2 == 0 and x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0:
        return x
    xp = torch.zeros(m, k + k % 2, dtype=x.dtype, device=x.device)
    xp[:, :k] = x
    return xp


def qgemv_half2(x, p, bias, out, config=None, asm=True, prefetch=None, early_outliers=None, lead=None, level=2,
                pin=None, cg=None, xhint=None, pipe=None, nreg=None, use_pdl=None, loop_outliers=None):
    """x [M, K] fp16/bf16, prepare_half2's dict p, bias [N] | None, out [M, N] -> out.  Any M (rows of x are
    split into programs of <= 4); meant for M <= ops.GEMV_MAX_M.  config None: pick_config's table for this
    (M, N, K); prefetch (0 / False, 1 / True, 2 steps ahead) overrides the config's depth.  early_outliers: load
    the first 32 outlier slots of each row before the K loop (None: when they cost <= 16 registers per thread,
    i.e. BN * 32 <= 512 * warps; (32, 4, 1) would hold 64 more through the loop, 164 -> 245 registers);
    False is the old epilogue (after the loop), kept for the benchmark's A/B.  lead: cache-hint distance in steps
    (0: none; None: the config's 6th element, else 0): the loop's top prefetches step t + lead into L2 (level 2) or
    L1 (level 1) -- a hint only, so results do not depend on it (CUDA only).  pin: a barrier after the register
    loads of each step, so ptxas cannot sink them below the step's math (None: the config's 7th element, else
    off).  cg: the weight loads skip L1 (.cg); xhint: L1 prefetch of the next step's x at the loop's top (CUDA
    only); None: the config's 8th / 9th element, else off.  pipe: software-pipeline depth of the K loop's loads
    (cp.async into shared memory, triton's pipeliner; needs prefetch 0; None: the config's 10th element, else 1 =
    plain loads).  nreg: registers per thread at most (ptxas maxnreg; None: the config's 11th element, else
    ptxas' choice): more warps per SM at the price of spills (CUDA only).  use_pdl: programmatic dependent launch
    (kernels/pdl.py; None: pdl.enabled(x)): the zeros, the first step's words and the early outlier slots are loaded
    while the kernel before finishes.  loop_outliers (M = 1; instead of early_outliers): the outlier slots spread
    over the K loop's whole steps, their indices loaded a step ahead and their x gathers issued before the step's
    math, so no idx -> gather chain is left after the loop (the rest, if any, as before); True: enough slots a step
    to cover R (a power of 2, <= 32), an int: that many (sm_90 AOT, ptxas' register choices are not monotonic in
    it: (8, 8, 1) 8 slots 194 registers, 2 / 4 / 16 spill); False / 0: off; None (with early_outliers None): True
    unless the config is a 1-warp one with early slots."""
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
    q = p["q"]
    bn, bkb, warps, *rest = config or pick_config(m, p["out_features"], k, q)
    stages = rest[0] if rest else 3
    depth = int(prefetch) if prefetch is not None else (rest[1] if len(rest) > 1 else 1)
    if depth not in (0, 1, 2):
        raise QuantEaseError(f"prefetch depth {prefetch!r} is not 0, 1 or 2")
    lead = int(lead) if lead is not None else (rest[2] if len(rest) > 2 else 0)
    pin = bool(pin) if pin is not None else (bool(rest[3]) if len(rest) > 3 else False)
    cg = bool(cg) if cg is not None else (bool(rest[4]) if len(rest) > 4 else False)
    xhint = bool(xhint) if xhint is not None else (bool(rest[5]) if len(rest) > 5 else False)
    pipe = int(pipe) if pipe is not None else (rest[6] if len(rest) > 6 else 1)
    nreg = int(nreg) if nreg is not None else (rest[7] if len(rest) > 7 else 0)
    if pipe < 1 or (pipe > 1 and depth != 0):
        raise QuantEaseError(f"pipe={pipe!r}: a pipeline depth >= 1, and > 1 only with prefetch 0 (the pipeliner "
                             f"replaces the register prefetch)")
    if lead < 0 or level not in (1, 2):
        raise QuantEaseError(f"cache hint lead={lead!r} level={level!r}: lead >= 0 steps, level 1 or 2")
    bm = 1 if m == 1 else (2 if m == 2 else BM_MAX)
    early = bn * 32 <= 512 * warps  # the early slots' default
    # loop_outliers' default (H100, session 13, kernels_half2.py --outliers at M = 1, 0.5% vs 0% outliers, table
    # (early slots or after the loop) -> loop): it wins where the config has no early slots, (32, 2, 1) 28672x8192
    # +9% -> +5% / +8% (two runs), and on the 4-warp ragged-K config, (8, 16, 4) 4096x11008 +12% -> +4%; it loses
    # on the 1-warp (8, 8, 1) with early slots: 11008x4096 +8% -> +31%, 4096^2 +6% -> +10%, 8192^2 +5% -> +9%
    # (8192x28672 -3% both)
    if loop_outliers is None:
        loop_outliers = early_outliers is None and not (early and warps == 1)
    if early_outliers is None:
        early_outliers = early
    words, zeros, oi, ov = p["words"], p["zeros"], p["outlier_idx"], p["outlier_val"]
    nblk = words.shape[1] // (3 * q)
    has_out = oi is not None
    r = oi.shape[1] if has_out else 0
    br = max(2, min(32, triton.next_power_of_2(max(r, 1))))
    per_step = 0 if loop_outliers is True or not loop_outliers else int(loop_outliers)
    if per_step < 0 or per_step & (per_step - 1):
        raise QuantEaseError(f"loop_outliers={loop_outliers!r}: True, False or a power of 2 (slots per K step)")
    full = (xq.shape[1] // (32 * q)) // bkb  # the kernel's whole steps
    ilr = 0
    if loop_outliers and bm == 1 and has_out and full > 0:  # True: enough slots a step to cover R
        ilr, early_outliers = per_step or min(32, triton.next_power_of_2(triton.cdiv(r, full))), False
    grid = (triton.cdiv(n, bn) * triton.cdiv(m, bm),)
    use_pdl = pdl.enabled(x, use_pdl)
    qgemv_half2_kernel[grid](
        xq, out, words, p["scales"], zeros if zeros is not None else p["scales"],
        oi if has_out else words, ov if has_out else p["scales"], bias if bias is not None else p["scales"],
        m, n, xq.shape[1], r, nblk,
        xq.stride(0), out.stride(0), words.stride(0), p["scales"].stride(0),
        zeros.stride(0) if zeros is not None else 0, oi.stride(0) if has_out else 0, ov.stride(0) if has_out else 0,
        BF16=x.dtype == torch.bfloat16, ZERO=2 ** (p["bits"] - 1), HAS_ZEROS=zeros is not None,
        PER_CHANNEL=p["group_size"] == -1, HAS_OUTLIERS=has_out, HAS_BIAS=bias is not None,
        ASM=x.is_cuda and asm, PREFETCH=depth, EARLY=early_outliers,
        LEAD=lead if x.is_cuda and asm else 0, LEVEL=level, PIN=pin,
        CG=cg, XHINT=xhint and x.is_cuda and asm, PIPE=pipe, PDL=use_pdl,
        XL=triton.next_power_of_2(max(1, 16 * q * bkb // 32)),
        LINES=triton.next_power_of_2(triton.cdiv(3 * q * bkb * 4, 128) + 1),
        Q=q, GB=max(1, p["group_size"] // (32 * q)),  # blocks per group (1 for groups of 32, 64, 128)
        BM=bm, BN=bn, BKB=bkb, BR=br, ILR=ilr, num_warps=warps, num_stages=stages,
        **xprefetch.launch_args(p, x, warps),
        **({"maxnreg": nreg} if nreg and x.is_cuda else {}), **pdl.launch_kwargs(use_pdl))
    return out
