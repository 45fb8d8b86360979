"""GEMM v6 (batched decode, M = 2..256): swap-AB on the half2 words, two weights per LOP3.

Reads the half2 layout of kernels/prepare.py with Q = 8 words per role (per channel, or groups of a multiple of
256 columns): for role r and code slot j (0..4) the 8 role words of a 256-column block hold the column pairs
(5 r + j) 8 + q, i.e. the 16 CONSECUTIVE columns 16 s .. 16 s + 15 of the block (s = 5 r + j; s = 15 is the
spare code, one bit in bit 15 of each role's lanes).  Read as int16, a role's [BN, 16] tile is in column order,
and each 32-bit register of it holds an even/odd column pair of one row -- what an mma.sync A-fragment register
holds (two consecutive k of a row).  So for every slot s of every block:

    c_s = (word >> sh) & (7 << p) | 2**e,  c_s - (2**e + z)     one LOP3 (+ one SHF for j = 3, 4) and one HSUB2
                                                               per TWO weights, straight into the A fragment
    acc [BN, BM] += tl.dot(c_s [BN, 16], x^T [16, BM])          x^T = x[:, 256 b + 16 s ..+ 16] (L2 reads)

A dot in a 1-warp program (the table's M = 2 entry) is mma.sync (HMMA.16816), the operands in registers: the role
tiles take one pass through shared memory per block (ldmatrix into the fragment layout), and so do the x^T tiles.
With 4 or 8 warps (M = 3..256 in the table since session 11) it is a wgmma whose A operand is the unpacked tile in
registers (x^T from shared memory, one tile for all BN rows of the program).
sm_90 AOT (triton 3.6), K loop per 256-column block at BN = 32: 607 instructions for 8192 weights, against 1345
for gemm_swap.py's 1-warp loop on the bit planes (its unpack is 2 LOP3 + FADD + half an F2FP per weight).  The loop is
software-pipelined (PIPE 2, triton's pipeliner: the next block's role tiles and 16 x tiles as cp.async copies, one
wait per block): with plain loads ptxas keeps every x-tile load below the previous slot's barrier, which makes a
block a chain of 16 L2 round trips (H200: 27.2 vs 17.8 us at 8192^2, M = 2).

The zero goes into the HSUB2 constant (per row, per group for groups); per-channel scales multiply the fp32
acc after the loop, group scales each block's partial sum.  Outliers (ELL) are added in the epilogue as in
gemm_swap.py (the same helper); SPLIT_K > 1 adds each split's partial with atomics after zeroing out.

Off CUDA (the CPU interpreter) the same codes come from plain int16 shifts and masks (ASM False).
"""
import os

import torch
import triton
import triton.language as tl

from quantease.errors import QuantEaseError
from quantease.kernels import gemm_swap, pdl, prologue, xprefetch
from quantease.kernels.outliers import ell_add, ell_split_add
from quantease.kernels.prepare import has_q8_words

# (BM, BN, num_warps, SPLIT_K[, PIPE[, BR[, OS[, PRE[, NREG[, IL]]]]]]) by M bucket (see qgemm_half2); SPLIT_K 0:
# gemm_swap.pick_split to SPLIT_TARGET programs.  H200, session 6 (benchmarks/kernels_half2.py --asym,
# results/kernels_half2.md): the software-pipelined loop (PIPE 2: the next block's words and x tiles by cp.async,
# one wait per block) against the plain one (a chain of 16 x-tile L2 round trips per block, each behind the previous
# slot's barrier) at 8192^2 M = 2 / 16: (16, 64) 17.8 / 23.2 vs 27.2 / 31.5 us; BN 32 20.5 / 33.1, BN 16 31.4 / 57.7,
# PIPE 3 (BN 32) 22.7 / 39.4; M = 32 (32, 64) 31.9 us.
CONFIGS = {
    2: (16, 64, 1, 0, 2),
    # M = 3-32 on warp groups: the dot is a wgmma (64 weight rows per warp group, N = BM) with the unpacked tile as
    # register A, and one x^T tile in shared memory serves BN rows -- the 1-warp programs above each read their own
    # x^T from L2, ~1.3 x bytes per word byte.  H100, session 11 (kernels_half2.py --narrow; 4096^2 / 8192^2 /
    # 28672x8192 / 8192x28672), against the 1-warp (16, 64, 1) / (32, 64, 1): M = 16 (16, 128, 4) 9.7 / 21.3 / 57.3 /
    # 58.5 us vs 10.2 / 26.0 / 89.7 / 70.8 ((16, 64, 4) 9.5 / 25.9 / 67.3 / 75.8; 8 warps lost); M = 4 the same
    # config 9.2 / 18.7 / 52.8 / 51.1 vs 8.9 / 19.9 / 58.4 / 51.5; M = 32 (32, 128, 4) 11.0 / 26.1 / 76.2 / 77.2 vs
    # 13.2 / 35.5 / 116.0 / 102.5 ((32, 256, 8) 12.5 / 23.8 / 78.7 / 68.7: better at K = 8192 / 28672, worse at
    # K = 4096, the decode shapes of Llama-3-8B).  M = 2 keeps the 1-warp entry (not timed on warp groups).
    16: (16, 128, 4, 0, 2),
    32: (32, 128, 4, 0, 2),
    # M = 33-128 with 4 / 8 warps: the dot is a wgmma with the unpacked tile as its register A operand (sm_90 AOT:
    # 656 loop instructions per 32 x 256 weights per warp at (64, 128, 4), 2 HGMMA per slot, x^T by descriptor).
    # H200, session 7 (kernels_half2.py --wide --asym; 4096^2 / 8192^2 / 28672x8192 / 8192x28672), against
    # gemm_swap's table on the planes: M = 64 13.5 / 40.0 / 128.4 / 101.5 us vs 17.2 / 54.7 / 198.1 / 187.8
    # ((64, 128, 8) 13.9 / 38.8 / 126.8 / 109.8; (64, 64, 4) 20.0 / 60.6 / 216.0 / 180.5); M = 128 (two 64-row
    # tiles) 22.4 / 62.4 / 228.2 / 202.1 vs 26.7 / 88.2 / 328.8 / 284.8 ((128, 128, 8) 25.0 / 76.1 / 223.8 / 213.2).
    # Session 8 (same command): BN 256 at M = 128, (64, 256, 4) 18.5 / 52.5 / 162.7 / 136.8 us vs (64, 128, 8)
    # 22.4 / 62.8 / 225.3 / 198.4 -- four HGMMA per wgmma wait and each x^T tile from shared memory used by twice the
    # rows (sm_90 AOT: 255 registers + 8 B of stack); at M = 64 (64, 256, 8) 14.5 / 43.5 / 134.8 / 129.7 lost to
    # (64, 128, 8) 13.5 / 39.3 / 126.2 / 110.3 ((64, 256, 4) not timed at M = 64).
    64: (64, 128, 4, 0, 2),
    128: (64, 256, 4, 0, 2),
    # M = 129-256: H100, session 9 (kernels_half2.py --large --asym), (64, 256, 4) against the dispatch's old path,
    # the words' dequant + cuBLAS, at M = 256: 31.0 / 85.6 / 299.7 / 253.6 us vs 35.2 / 126.7 / 428.0 / 417.7
    # ((128, 256, 8) 34.1 / 105.0 / 319.5 / 310.4); with 0.5% outliers (ell_add after it) 48.9 / 120.4 / 378.9 / 380.0
    # vs 40.1 / 134.9 / 459.8 / 490.9.  At M = 512 level with the dequant path at 0% (1.01-1.04x faster on the big
    # shapes), 1.2-1.7x slower with outliers: M > 256 stays on the dequant path.
    256: (64, 256, 4, 0, 2),
}
SPLIT_TARGET = 2048  # programs wanted for 1-warp configs (~16 warps per SM)
SPLIT_TARGET_WARPS = 512  # for 4- / 8-warp configs (gemm_swap.SPLIT_TARGET_REGA)
MAX_M = max(CONFIGS)
# M = 2 too: ahead of the half2 GEMV at M = 2 (same call, asymmetric): 8192^2 17.8 vs 19.5 us, 28672x8192 52.3 vs
# 79.8, 8192x28672 44.9 vs 55.9, 4096^2 8.2 vs 8.0
MIN_M = 2
# Outliers added after the GEMM by ell_split_add instead of the epilogue at M <= 4 on layers with >= 2^20 slots
# (N x R).  H100, 0.5% outliers, epilogue vs split: session 9 (1-warp configs) M = 2 8192x28672 76.6 vs 60.5 us,
# 28672x8192 72.6 vs 64.2, M = 4 77.0 vs 66.5 / 77.5 vs 71.6; session 11 (kernels_half2.py --outliers, M = 4 on
# (16, 128, 4)) M = 2 83.9 vs 62.7 / 77.5 vs 64.5, M = 4 71.1 vs 68.1 / 72.9 vs 67.1 -- while 8192^2 (336 k slots)
# lost in both (M = 2 23.5 vs 24.4, M = 4 22.9 vs 25.8) and every shape at M >= 16 (8192^2 M = 16 25.9 vs 37.4).
SPLIT_ADD_MAX_M = 4
SPLIT_ADD_MIN_SLOTS = 1 << 20
# The x^T copy (fused outliers gathering from x^T) and the zeroing of out (split K) as one launch (kernels/prologue.py)
# instead of torch's copy and fill: one launch less per such call (128 per decode step at batch 32 in vLLM).  H100,
# session 13 (kernels_half2.py --prologue, 0.5% outliers, table config, two launches -> one): 8192^2 M = 16 26.7 ->
# 25.0 us, M = 32 34.6 -> 33.6; 28672x4096 43.5 -> 42.1 / 56.7 -> 55.1; 4096x14336 28.4 -> 26.7 / 37.4 -> 35.0;
# 6144x4096 15.5 -> 15.5 / 18.4 -> 17.2 (y agrees to 1e-4..6e-4).  $QUANTEASE_PROLOGUE = 1 / 0 overrides the default
# (an A/B inside vLLM, whose processes inherit the environment).
PROLOGUE_ENV, PROLOGUE_DEFAULT = "QUANTEASE_PROLOGUE", "1"
_prologue_flag = os.environ.get(PROLOGUE_ENV, PROLOGUE_DEFAULT) or PROLOGUE_DEFAULT
if _prologue_flag not in ("0", "1"):
    raise QuantEaseError(f"${PROLOGUE_ENV}={_prologue_flag!r}: 0 (torch's copy and fill, two launches) or 1 (one "
                         f"launch); default {PROLOGUE_DEFAULT}")
FUSED_PROLOGUE = _prologue_flag == "1"
# The outlier epilogue is gemm_swap.add_outliers (a loop of BR-slot steps).  H200, session 6, 0.5% outliers (the loop:
# +23-56% over 0%; kernels_half2.md): the split's slots prefetched into L2 first -2..+9 points, 2 / 4 slots per step
# -18..+19 / -24..+12 (4 wins at K = 28672 only), 2 / 3 / 4 steps unrolled per iteration 0..+25 / -3..+5 / +1..+17
# (the unrolled epilogue is in commit c31b07b; the L2 prefetch was not committed).  Session 7 (call 6): OS outlier-only
# programs per tile (config element 7) -- OS 1 / 2 / 4: worse at 8192^2 (+67..+113 / +36..+58 / +30..+67% vs the
# table's +25..+37%) and at K = 28672 (OS 1 +118..+353%: each program walks R / OS slots, one idx -> gather step
# after another, ~1.4 us each: 207 us for R = 143), better at 28672x8192 (OS 2 + BR 4: +13..+28% vs +22..+40%) and
# 4096^2 (OS 4: +21..+38% vs +33..+41%); no rule from two shapes: the table keeps OS 0.  The epilogue loop as
# tl.range(num_stages=3): the same SASS (sm_90 AOT; its int16 idx loads are no cp.async candidates), not timed.
# PRE (config element 8): a split's first PRE slots loaded before the K loop (AOT: the loads stay at the top), so
# their gathers after it wait on no load.  Session 8 (kernels_half2.py --asym --outliers, all four shapes, M = 2-32):
# PRE 2 -6..+10 points against the table's cost (8192^2: +25..+46% vs +25..+37%), PRE 4 -7..+21: no gain, the table
# keeps PRE 0.  The chain is not the idx load's latency alone (cf. the L2 prefetch of session 6).
# IL (config element 10, session 12): the epilogue's gather steps moved into the K loop, one per block, so that each
# step's x^T round trip overlaps the words' DRAM stream instead of following it.  H100, session 13 (kernels_half2.py
# --outliers, 0.5% over 0%): lost at 8192^2 M = 4 / 16 (+57 / +36% vs the table's +24 / +26%: 167-244 registers cost
# more occupancy than the chain it hides), won only at 28672x8192 M = 16 / 32 (+35 / +36% vs +41 / +44%): off.
# OF (config element 11, session 14): the outlier steps before the K loop while the words stream into L2.  Not yet
# timed; $QUANTEASE_OUTLIERS_FIRST = n (> 0) puts it in every table entry, n blocks prefetched (an A/B inside vLLM).
OF_ENV = "QUANTEASE_OUTLIERS_FIRST"
_of_flag = os.environ.get(OF_ENV, "0") or "0"
if not _of_flag.isdigit():
    raise QuantEaseError(f"${OF_ENV}={_of_flag!r}: a count of blocks (0: the outliers after the K loop)")
if int(_of_flag) > 0:
    CONFIGS = {b: (c + (None,) * 10)[:10] + (int(_of_flag),) for b, c in CONFIGS.items()}


def pick_config(m):
    for bucket in sorted(CONFIGS):
        if m <= bucket:
            return CONFIGS[bucket]
    return CONFIGS[max(CONFIGS)]


def pick_outlier_path(m, n, r, bm, outliers_only=False):
    """Where qgemm_half2 adds the outliers by default: the epilogue ("fused") up to gemm_swap.FUSED_MAX_BM rows per
    tile, except for few rows of x on layers with many slots ("split": outliers.ell_split_add after the GEMM, whose
    programs each walk a few slots while the epilogue walks its split's share serially); "ell" above."""
    if bm > gemm_swap.FUSED_MAX_BM and not outliers_only:
        return "ell"
    many = m <= SPLIT_ADD_MAX_M and n * r >= SPLIT_ADD_MIN_SLOTS
    return "split" if many and not outliers_only else "fused"


def supports(p, x):
    """The half2 words at Q = 8 are there (gemv_half2.add_layout, with int16 zeros) and x is fp16 / bf16."""
    return (has_q8_words(p) and (p["zeros"] is None or p["zeros"].dtype != torch.uint8)
            and x.dtype in (torch.float16, torch.bfloat16))


# $0 = t - sub on both 16-bit lanes, sub the asm's first input ($1): bf16 as t * 1 + sub (an FMA; sub holds
# -(2**e + z): the sub.bf16x2 form needs a newer PTX ISA), fp16 as sub.f16x2 (its `one` register unused)
_SUB_BF16 = tl.constexpr("mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, t, one, $1;")
_SUB_F16 = tl.constexpr("sub.f16x2 $0, t, $1;")


@triton.jit
def _slot(w, sub, j: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """Code slot j (0..4) of an int16 role tile -> code - z in x's dtype.  sub: int16 tile, 2**e + z with z at
    bit p (bf16: its negation, for the FMA form), i.e. what the magic OR adds plus the zero."""
    MB: tl.constexpr = 7 if BF16 else 10  # mantissa bits: codes at bits p..p+2 <= MB - 1 are unpacked in place
    p: tl.constexpr = 3 * j if 3 * j + 3 <= MB else 0
    sh: tl.constexpr = 3 * j - p
    mask: tl.constexpr = (7 << p) * 0x10001
    magic: tl.constexpr = (((134 - p) << 7) if BF16 else ((25 - p) << 10)) * 0x10001
    dt = tl.bfloat16 if BF16 else tl.float16
    if ASM:
        return tl.inline_asm_elementwise(
            f"{{ .reg .b32 t, one; shr.b32 t, $2, {sh}; lop3.b32 t, t, {mask}, {magic}, 0xEA; "
            f"{_SUB_BF16 if BF16 else _SUB_F16} }}", "=r,r,r", [sub, w], dtype=dt, is_pure=True, pack=2)
    else:
        return (slot_code(w, j).to(tl.float32) - _zero_of(sub, p, BF16)).to(dt)


@triton.jit
def _spare(w0, w1, w2, sub, BF16: tl.constexpr, ASM: tl.constexpr):
    """Slot 15 (the spare code: bit r in bit 15 of role r's lanes) -> code - z in x's dtype; sub as for p = 0."""
    magic: tl.constexpr = (134 << 7 if BF16 else 25 << 10) * 0x10001
    dt = tl.bfloat16 if BF16 else tl.float16
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a, b, c, t, one; shr.b32 a, $2, 15; shr.b32 b, $3, 14; shr.b32 c, $4, 13; "
            f"lop3.b32 t, a, 0x00010001, {magic}, 0xEA; lop3.b32 t, b, 0x00020002, t, 0xEA; "
            f"lop3.b32 t, c, 0x00040004, t, 0xEA; {_SUB_BF16 if BF16 else _SUB_F16} }}",
            "=r,r,r,r,r", [sub, w0, w1, w2], dtype=dt, is_pure=True, pack=2)
    else:
        return (spare_code(w0, w1, w2).to(tl.float32) - _zero_of(sub, 0, BF16)).to(dt)


@triton.jit
def slot_code(w, j: tl.constexpr):
    """The integer code of slot j (0..4) of a role tile (int16 lanes, or their int32 widening)."""
    return (w >> (3 * j)) & 7


@triton.jit
def spare_code(w0, w1, w2):
    """The integer code of slot 15, the spare: bit r in bit 15 of role r's lanes."""
    return ((w0 >> 15) & 1) | ((w1 >> 14) & 2) | ((w2 >> 13) & 4)


@triton.jit
def block_code(r0, r1, r2, s: tl.constexpr):
    """The integer code of slot s (0..15) of a block, from its three role tiles: columns 16 s .. 16 s + 15."""
    if s < 5:
        return slot_code(r0, s)
    elif s < 10:
        return slot_code(r1, s - 5)
    elif s < 15:
        return slot_code(r2, s - 10)
    else:
        return spare_code(r0, r1, r2)


@triton.jit
def _zero_of(sub, p: tl.constexpr, BF16: tl.constexpr):
    """The interpreter path's z back from the HSUB2 constant (bits p.. of its mantissa)."""
    return (((sub & 0x7FFF) >> p) & 7).to(tl.float32)


@triton.jit
def _subs(z, BF16: tl.constexpr):
    """z [BN] (int16 or int32) -> [BN, 16] int16 tiles 2**e + z for the bit positions p = 0, 3, 6 of _slot."""
    # fp16 unpacks in place at p = 0 / 3 / 6, bf16 at 0 / 3 (its p = 6 tile is unused); bf16's are negated (the
    # FMA form).  z must not come from a uint8 load: triton sizes the mma operand layout (kWidth) by the narrowest
    # type in the A tile's def chain, and with 8 bits there x^T goes through 176 SEL + 88 SHFL per block instead
    # of one shared-memory pass (sm_90 AOT: 787 vs 605 loop instructions); gemv_half2.add_layout makes them int16.
    zi = tl.broadcast_to(z.to(tl.int32)[:, None], (z.shape[0], 16))
    neg: tl.constexpr = 0x8000 if BF16 else 0
    s0 = ((134 << 7 if BF16 else 25 << 10) | zi | neg).to(tl.int16)
    s3 = (((131 << 7) if BF16 else (22 << 10)) | (zi << 3) | neg).to(tl.int16)
    s6 = (((128 << 7) if BF16 else (19 << 10)) | (zi << 6) | neg).to(tl.int16)
    return s0, s3, s6


@triton.jit
def _pick(s0, s3, s6, j: tl.constexpr, BF16: tl.constexpr):
    """The _subs tile for slot j's bit position (the p that _slot computes)."""
    MB: tl.constexpr = 7 if BF16 else 10
    p: tl.constexpr = 3 * j if 3 * j + 3 <= MB else 0
    if p == 0:
        return s0
    elif p == 3:
        return s3
    else:
        return s6


@triton.jit
def _xt(x_cols, blk, s: tl.constexpr, q, K, mask_m):
    """x^T tile [16, BM] of slot s of block blk: x[m, 256 blk + 16 s + q] (0 past K and M)."""
    kx = blk * 256 + s * 16 + q
    return tl.load(x_cols + kx[:, None], mask=(kx < K)[:, None] & mask_m[None, :], other=0.0)


@triton.jit
def _slot_tile(oi_ptr, ov_ptr, offs_n, mask_n, offs_r, r_hi, stride_oi, stride_ov):
    """idx, val, mask [BN, len(offs_r)] of the outlier slots offs_r (those < r_hi)."""
    pmask = mask_n[:, None] & (offs_r[None, :] < r_hi)
    idx = tl.load(oi_ptr + offs_n[:, None] * stride_oi + offs_r[None, :], mask=pmask, other=0).to(tl.int32)
    val = tl.load(ov_ptr + offs_n[:, None] * stride_ov + offs_r[None, :], mask=pmask, other=0.0).to(tl.float32)
    return idx, val, pmask


@triton.jit
def _slots_ahead(oi_ptr, ov_ptr, offs_n, mask_n, R, split, stride_oi, stride_ov, PRE: tl.constexpr):
    """idx, val, mask [BN, PRE] of this split's first PRE outlier slots (the split's share as in add_outliers)."""
    r_lo, r_hi = gemm_swap.split_slots(R, split)
    return _slot_tile(oi_ptr, ov_ptr, offs_n, mask_n, r_lo + tl.arange(0, PRE), r_hi, stride_oi, stride_ov)


@triton.jit
def _add_slots_ahead(acc, pidx, pval, pmask, xt_ptr, offs_m, mask_m, stride_xt, stride_xtm, PRE: tl.constexpr):
    """acc += the preloaded slots: PRE gathers that wait on nothing but registers (no idx load in the chain)."""
    which = tl.arange(0, PRE)[None, :]
    for s in tl.static_range(PRE):
        idx = tl.sum(tl.where(which == s, pidx, 0), axis=1)
        val = tl.sum(tl.where(which == s, pval, 0.0), axis=1)
        hit = tl.max(tl.where(which == s, pmask.to(tl.int32), 0), axis=1) > 0
        xg = tl.load(xt_ptr + idx[:, None] * stride_xt + offs_m[None, :] * stride_xtm,
                     mask=hit[:, None] & mask_m[None, :], other=0.0)
        acc += xg.to(tl.float32) * val[:, None]
    return acc


@triton.jit
def _prefetch_l2(w_ptr, offs_n, N, stride_w, blk0, blk1, PF: tl.constexpr):
    """L2 prefetch (no registers held, CUDA only) of blocks blk0 .. blk0 + PF - 1 (those < blk1) of the rows'
    words: the first and last int16 of each row's 96-byte run of a block (two 128-byte lines at most)."""
    rows = w_ptr + tl.minimum(offs_n, N - 1)[:, None] * stride_w
    ends = tl.arange(0, 2) * 47
    for b in tl.static_range(PF):
        blk = tl.where(blk0 + b < blk1, blk0 + b, 0)  # past the split's range: block 0 again (harmless)
        addr = (rows + blk * 48 + ends[None, :]).to(tl.int64, bitcast=True)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.b32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def qgemm_half2_kernel(x_ptr, xt_ptr, y_ptr, w_ptr, s_ptr, z_ptr, b_ptr, oi_ptr, ov_ptr,
                       M, N, K, R, group_size, blocks_per_split,
                       stride_xm, stride_xt, stride_xtm, stride_ym, stride_w, stride_s, stride_z, stride_oi,
                       stride_ov, xlast, xa0, xn0, xa1, xn1, xa2, xn2, xa3, xn3,
                       BF16: tl.constexpr, ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUPED: tl.constexpr,
                       HAS_BIAS: tl.constexpr, OUTLIERS: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr,
                       ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PIPE: tl.constexpr,
                       OS: tl.constexpr, PRE: tl.constexpr, IL: tl.constexpr, OF: tl.constexpr,
                       PDL: tl.constexpr, PF: tl.constexpr,
                       XPF: tl.constexpr, XPF_N: tl.constexpr, XPF_LANES: tl.constexpr):
    # GROUPED: groups of whole 256-column blocks (scale, zero per block); else per channel.  OS > 0: axis-1 programs
    # 0 .. OS - 1 of each tile add only the outliers (a share of the slots each, no K blocks), the others are the K
    # splits; OS = 0: every split adds a share in its epilogue
    pdl.start(PDL)
    offs_m, mask_m, offs_n, mask_n, split = gemm_swap.tile_offsets(M, N, BM, BN)
    q = tl.arange(0, 16)
    rows = w_ptr + offs_n[:, None] * stride_w + q[None, :]  # int16 view: 48 per row per block, role r at 16 r
    x_cols = x_ptr + offs_m[None, :] * stride_xm  # x^T slot tile [16, BM]: x read with strides
    if HAS_ZEROS and not GROUPED:  # int16 (prepare_weights): a uint8 here sends x^T through shuffles (see _subs)
        z = tl.load(z_ptr + offs_n * stride_z, mask=mask_n, other=0)
    else:
        z = tl.full((BN,), ZERO, tl.int32)
    s0, s3, s6 = _subs(z, BF16)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if OUTLIERS and PRE > 0:  # this split's first PRE slots: indices and values loaded before the K loop
        pidx, pval, pmask = _slots_ahead(oi_ptr, ov_ptr, offs_n, mask_n, R, split, stride_oi, stride_ov, PRE)
    blk0 = (split - OS) * blocks_per_split
    blk1 = min(blk0 + blocks_per_split, tl.cdiv(K, 256))
    if OS > 0:
        blk1 = tl.where(split < OS, blk0, blk1)  # the outlier programs: no K blocks
    if IL:  # one BR-slot step of this split's outliers per K block, added into acc -- per channel divided by the
        # row's scale, which multiplies acc after the loop (a second accumulator instead: 205 vs 167 registers at
        # (16, 128, 4), sm_90 AOT); the first step's indices and values loaded here
        r_lo, r_hi = gemm_swap.split_slots(R, split)
        offs_r = r_lo + PRE + tl.arange(0, BR)
        idx, val, rmask = _slot_tile(oi_ptr, ov_ptr, offs_n, mask_n, offs_r, r_hi, stride_oi, stride_ov)
        if not GROUPED:  # (the scales are loaded again after the loop: holding them through it, 186 registers)
            inv_s = 1.0 / tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=1.0).to(tl.float32)
    if PF > 0:  # the first PF blocks' words on their way into L2 while the kernel before (or, OF, the outlier
        # steps below) runs
        _prefetch_l2(w_ptr, offs_n, N, stride_w, blk0, blk1, PF)
    pdl.wait(PDL)  # above: only this layer's tensors; x, x^T and out below
    if OF:  # the split's outlier steps before the K loop, while DRAM streams the prefetched words into L2 (after
        # the loop every program of the one wave waits on its gather chain with DRAM idle); per channel divided by
        # the row's scale, which multiplies acc after the loop (nonzero: prepare.nonzero_scales)
        acc = gemm_swap.add_outliers(acc, xt_ptr, oi_ptr, ov_ptr, offs_n, mask_n, offs_m, mask_m, R, split,
                                     stride_xt, stride_xtm, stride_oi, stride_ov, BR)
        if not GROUPED:
            acc = acc / tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=1.0).to(tl.float32)[:, None]
    for blk in tl.range(blk0, blk1, num_stages=PIPE):
        if IL:  # this block's step: its gathers (indices loaded a block ago) in flight during the block's math, and
            # the next step's indices and values on their way
            xg = tl.load(xt_ptr + idx[:, :, None] * stride_xt + offs_m[None, None, :] * stride_xtm,
                         mask=rmask[:, :, None] & mask_m[None, None, :], other=0.0)
            vg = val
            offs_r += BR
            idx, val, rmask = _slot_tile(oi_ptr, ov_ptr, offs_n, mask_n, offs_r, r_hi, stride_oi, stride_ov)
        r0 = tl.load(rows + blk * 48, mask=mask_n[:, None], other=0)  # the three role tiles (0 past N)
        r1 = tl.load(rows + blk * 48 + 16, mask=mask_n[:, None], other=0)
        r2 = tl.load(rows + blk * 48 + 32, mask=mask_n[:, None], other=0)
        if GROUPED:
            g = (blk * 256) // group_size
            sb = tl.load(s_ptr + offs_n * stride_s + g, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zb = tl.load(z_ptr + offs_n * stride_z + g, mask=mask_n, other=0)
                s0, s3, s6 = _subs(zb, BF16)
            part = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            part = acc
        for s in tl.static_range(16):
            xs = _xt(x_cols, blk, s, q, K, mask_m)
            if s < 5:
                c = _slot(r0, _pick(s0, s3, s6, s % 5, BF16), s % 5, BF16, ASM)
            elif s < 10:
                c = _slot(r1, _pick(s0, s3, s6, s % 5, BF16), s % 5, BF16, ASM)
            elif s < 15:
                c = _slot(r2, _pick(s0, s3, s6, s % 5, BF16), s % 5, BF16, ASM)
            else:
                c = _spare(r0, r1, r2, s0, BF16, ASM)
            if BF16 and not ASM:  # the CPU interpreter's bf16 dot is not exact: fp32 operands, full precision
                part = tl.dot(c.to(tl.float32), xs.to(tl.float32), part, input_precision="ieee")
            else:
                part = tl.dot(c, xs.to(c.dtype), part)
        if GROUPED:
            acc += part * sb[:, None]
        else:
            acc = part
        if IL:
            o = tl.sum(xg.to(tl.float32) * vg[:, :, None], axis=1)
            acc += o if GROUPED else o * inv_s[:, None]
    pdl.start_late(PDL)  # mode LATE: the next kernel's programs overlap only this one's epilogue and store
    if not GROUPED:
        acc = acc * tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if OUTLIERS and not OF:
        if OS == 0:
            if PRE > 0:
                acc = _add_slots_ahead(acc, pidx, pval, pmask, xt_ptr, offs_m, mask_m, stride_xt, stride_xtm, PRE)
            skip = PRE
            if IL:  # the slots the K loop added; the rest (more slots than blocks) here
                skip += (blk1 - blk0) * BR
            acc = gemm_swap.add_outliers(acc, xt_ptr, oi_ptr, ov_ptr, offs_n, mask_n, offs_m, mask_m, R, split,
                                         stride_xt, stride_xtm, stride_oi, stride_ov, BR, None, skip)
        elif split < OS:
            acc = gemm_swap.add_outliers(acc, xt_ptr, oi_ptr, ov_ptr, offs_n, mask_n, offs_m, mask_m, R, split,
                                         stride_xt, stride_xtm, stride_oi, stride_ov, BR, OS)
    gemm_swap.store_tile(acc, y_ptr, offs_n, mask_n, offs_m, mask_m, stride_ym, SPLIT, ATOMIC)
    # the next layers' words on their way into L2 while the kernels between run (kernels/xprefetch.py)
    xprefetch.tail(tl.program_id(0) + tl.program_id(1) * tl.num_programs(0), tl.num_programs(0) * tl.num_programs(1),
                   xlast, xa0, xn0, xa1, xn1, xa2, xn2, xa3, xn3, XPF, XPF_N, XPF_LANES)


def qgemm_half2(x, p, bias, out, config=None, asm=True, gather_x=None, outliers_only=False, outlier_path=None,
                use_pdl=None):
    """x [M, K] fp16/bf16 (stride(1) == 1), prepared dict p with the Q = 8 half2 words, bias [N] | None,
    out [M, N] -> out.  config = (BM, BN, num_warps, SPLIT_K[, PIPE[, BR[, OS[, PRE[, NREG[, IL[, OF]]]]]]]) overrides
    the table:
      SPLIT_K  0: auto (gemm_swap.pick_split)
      PIPE     the K loop software-pipelined that deep; None / 1: plain loads
      BR       outlier slots per epilogue step; 0 / None: from gemm_swap.BR_ELEMS
      OS       programs per weight tile that add only the outliers, scheduled first beside the SPLIT_K ones;
               0 / None: the outliers in the K splits' epilogues
      PRE      (a power of 2) each split's first PRE slot indices and values loaded before the K loop, so that
               their gathers after it wait on no load, the rest as before; 0 / None: none
      NREG     registers per thread at most (ptxas maxnreg, CUDA only): more warps per SM for the latency-bound
               K loop, at the price of spills; 0 / None: ptxas' choice
      IL       True: the split's outlier slots BR at a time inside the K loop, one step per block (the rest, if
               the split has more steps than blocks, in the epilogue); 0 / None: all in the epilogue (OS 0 only).
               Per channel it divides by the scales: nonzero ones (prepare.nonzero_scales re-encodes zeros at load)
      OF       n > 0: the first n of the split's blocks' words L2-prefetched at the start, and its outlier slots
               (if any) added BEFORE the K loop, so that DRAM streams the words during the gather steps; divides
               by the scales as IL; OS 0 only, and it takes precedence over PRE and IL.  0 / None: off
    outliers_only (benchmarks: the epilogue's cost alone): skip the K loop, out = x @ H^T (+ bias) only.
    outlier_path: "fused" (the epilogue), "ell" (outliers.ell_add after the GEMM), "split" (outliers.ell_split_add
    after it: many short programs, the GEMM keeps its registers); None: pick_outlier_path (fused up to
    gemm_swap.FUSED_MAX_BM rows per tile, split for few rows and many slots, else ell).  use_pdl: programmatic
    dependent launch (kernels/pdl.py; None: pdl.enabled(x)): the zeros and the first two blocks' words (an L2
    prefetch) are requested while the kernel before finishes."""
    if not supports(p, x):
        raise QuantEaseError("qgemm_half2 needs fp16/bf16 x and 3-bit half2 words at Q = 8 with 16-bit zeros "
                             "(gemv_half2.add_layout: per channel or groups of a multiple of 256); got "
                             f"{x.dtype}, bits={p['bits']}, group_size={p['group_size']}, words "
                             f"{'absent' if p.get('words') is None else 'present'}")
    m, k = x.shape
    n = p["out_features"]
    cfg = tuple(config or pick_config(m))
    bm, bn, warps, split = cfg[:4]
    pipe = cfg[4] if len(cfg) > 4 else None
    br = cfg[5] if len(cfg) > 5 else None
    os_ = (cfg[6] if len(cfg) > 6 else 0) or 0
    pre = (cfg[7] if len(cfg) > 7 else 0) or 0
    nreg = (cfg[8] if len(cfg) > 8 else 0) or 0
    il = (cfg[9] if len(cfg) > 9 else 0) or 0
    of = (cfg[10] if len(cfg) > 10 else 0) or 0
    if split == 0:
        split = gemm_swap.pick_split(m, n, k, bm, bn, SPLIT_TARGET if warps == 1 else SPLIT_TARGET_WARPS)
    split, bps = gemm_swap.split_blocks(k, split)
    words = p["words"].view(torch.int16)
    zeros, oi, ov = p["zeros"], p["outlier_idx"], p["outlier_val"]
    if outlier_path not in (None, "fused", "ell", "split"):
        raise QuantEaseError(f"outlier_path {outlier_path!r} is not one of None, 'fused', 'ell', 'split'")
    if outlier_path is None:
        outlier_path = pick_outlier_path(m, n, oi.shape[1] if oi is not None else 0, bm, outliers_only)
    fused = oi is not None and outlier_path == "fused"
    r = oi.shape[1] if fused else 0
    os_ = os_ if r > 0 and not outliers_only else 0
    zero = split + os_ > 1  # the splits add into out with atomics
    if FUSED_PROLOGUE and zero and gemm_swap.needs_xt(m, n, r, gather_x):  # the x^T copy and the zeroing in one launch
        xt, sxt, sxtm = prologue.prologue(x, out, True, True)
    else:
        xt, sxt, sxtm = gemm_swap.epilogue_x(x, n, r, gather_x)
        if zero:
            out.zero_()
    br = br or gemm_swap.epilogue_br(warps, bm, bn)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), os_ + split)
    use_pdl = pdl.enabled(x, use_pdl)
    of_on = of > 0 and r > 0 and os_ == 0 and not outliers_only
    pf = 0  # blocks L2-prefetched at the start (an inline asm: CUDA only)
    if asm and x.is_cuda:
        pf = max(2 if use_pdl == pdl.EARLY else 0, min(of, bps))
    qgemm_half2_kernel[grid](
        x, xt, out, words, p["scales"], zeros if zeros is not None else p["scales"],
        bias if bias is not None else p["scales"], oi if oi is not None else words,
        ov if ov is not None else p["scales"],
        m, n, k, r, p["group_size"], 0 if outliers_only else bps,
        x.stride(0), sxt, sxtm, out.stride(0), words.stride(0), p["scales"].stride(0),
        zeros.stride(0) if zeros is not None else 0, oi.stride(0) if oi is not None else 0,
        ov.stride(0) if ov is not None else 0,
        BF16=x.dtype == torch.bfloat16, ZERO=4, HAS_ZEROS=zeros is not None, GROUPED=p["group_size"] != -1,
        HAS_BIAS=bias is not None, OUTLIERS=r > 0, ASM=asm and x.is_cuda, SPLIT=zero, ATOMIC=x.is_cuda,
        BM=bm, BN=bn, BR=br, PIPE=pipe, OS=os_, PRE=pre if r > 0 and os_ == 0 and not of_on else 0,
        IL=bool(il) and r > 0 and os_ == 0 and not of_on, OF=of_on, PDL=use_pdl, PF=pf,
        num_warps=warps, num_stages=1, **({"maxnreg": nreg} if nreg and x.is_cuda else {}),
        **xprefetch.launch_args(p, x, warps), **pdl.launch_kwargs(use_pdl))
    if oi is not None and outlier_path == "ell":
        ell_add(x, oi, ov, out)
    elif oi is not None and outlier_path == "split":  # gathers from x or x^T by the epilogue's own rule
        src = gemm_swap.epilogue_x(x, n, oi.shape[1], gather_x)[0]
        ell_split_add(x, oi, ov, out, xt=None if src is x else src)
    return out
