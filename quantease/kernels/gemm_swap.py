"""GEMM path v5 (batched decode, M = 3..128; from M = 33 on where gemm_half2.py applies): swap-AB, the dequantized
weight is the MMA's A operand.

Computes y^T = W x^T: program (pid_n, pid_m, split) owns acc [BN, BM] (fp32, weight rows x tokens) and walks
its share of K one 256-column block at a time.  It loads the block's [BN, WPB] plane words once; for each code
slot j (unrolled) the tile unpacked in place from those words is the 16 (WPB) CONTIGUOUS columns
256 b + j WPB .. + WPB (prepare.py's layout), i.e. exactly one K step of the MMA:

    acc += tl.dot(w_j [BN, WPB] fp16/bf16, x_j^T [WPB, BM])

On Hopper, wgmma takes A from registers and B from shared memory, so in this orientation the unpacked weight
need not go through shared memory (v3 had it as B: one smem round trip per slot); only x^T (small, L2-resident)
is staged in smem.  Triton 3.6 keeps A in registers only if every op between the loads and the dot is an
elementwise arith op (or a unary inline asm) on loaded tiles and constants, with no narrowing conversion
(OptimizeDotOperands' MMAV3HoistLayoutConversion), and only without its software pipelining.  Hence the paths:

  REGA (fp16/bf16 x, per channel or groups of whole blocks, symmetric or asymmetric): the code stays float32
    from the unpack (2**(23 - p) + c, two LOP3s, one FADD: c - 2**(b-1) exactly) to a tf32 wgmma -- exact,
    since c - 2**(b-1) and fp16/bf16 x values are exact in tf32 -- at half the fp16 MMA rate, which small M
    does not notice.  The plane words are converted to the MMA layout once per 256 columns (one smem pass of
    the words, 1/16 of the weight tile's bytes); num_stages = 1, latency hidden by occupancy (split-K to ~4
    programs per SM).  Asymmetric grids (uint8 z): the per-row z cannot enter the unpack (a [BN] broadcast
    blocks the hoist), so the loop is the symmetric one and acc[n, m] -= (z[n] - 2**(b-1)) * sum_k x[m, k]
    follows it, before the scale: per channel, each split sums its own K range of x in a second pass after
    the loop (x is L2-resident; no extra registers in the loop, no extra launch); groups of whole blocks sum
    the slot tiles of each block as the loop loads them (+26 registers at (16, 64, 4)).
  16-bit A (everything else, and large M where the MMA rate matters): the same unpack, rounded to x's dtype;
    Triton stages that tile through shared memory per slot (STSM + LDSM), loads pipelined (num_stages >= 2).
  1-warp programs (num_warps 1, the table's M <= 32 entries; 16-bit A): a dot in one warp cannot be a wgmma, so
    triton emits mma.sync (HMMA.16816) with BOTH operands in registers -- the unpacked tile straight from the
    unpack, the x^T fragments loaded from global in the operand layout -- and no smem, fence or barrier in the K
    loop (H200: 15% faster than the 4-warp register-A loop at M = 4-16, results/kernels_swap.md).  That holds only
    with kWidth 4, which triton derives from the narrowest type feeding the weight tile: the asymmetric uint8 zero
    gives it; symmetric grids load a dummy uint8 zero for it (ZLOAD).  WPF loads the next block's words one
    iteration ahead (it wins at BM 32).
Per-channel scales (and groups of whole blocks) multiply the fp32 acc, not the weight.  Other group sizes
dequantize per element (s * (c - z) rounded to 16 bits, as gemm.py does) on the 16-bit path.

Outliers (ELL idx/val [N, R]): OUTLIERS=1 adds them in the epilogue, acc[n, :] += val[n, r] * x^T[idx[n, r], :]
from x^T [K, M] (made once per call, contiguous along M: 2 BM-byte gathers; gather_x: from x itself, no copy,
M sectors per slot); OUTLIERS=2 leaves them to the
separate launch of kernels/outliers.py.  SPLIT_K > 1 (too few programs for the SMs) zeroes out and adds each
split's partial with atomics in out's dtype (one extra rounding per split; bias by split 0, each split R / SPLIT
of the outlier slots).

Measured (H100, benchmarks/kernel_notes.md "v5 measured"): the REGA loop is latency-bound, not issue-bound: each
slot is a serial chain (x tile L2 load -> smem -> proxy fence -> barrier -> wgmma -> wait), ~930 cycles at 4
programs / SM.  XPF (config element 7) loads the x slot tiles that many slots ahead to take the L2 round trip off
that chain.
"""
import torch
import triton
import triton.language as tl

from quantease.errors import QuantEaseError
from quantease.kernels.gemm import block_grid, block_loads, block_split, block_words, group_dequant, slot_codes
from quantease.kernels.outliers import add_tile, ell_add, slot_sums

# (BM, BN, num_warps, num_stages, SPLIT_K, REGA[, XPF[, PIPE[, WPF]]]) by M bucket; SPLIT_K 0 = pick_split
# (wrapper); XPF = x tiles loaded that many slots ahead; PIPE, WPF: see qgemm_swap.  Measured on the H100
# (results/kernels_swap.md): the 10:05 UTC sweep over 6 shapes for 32/128/256, the 10:40 UTC --quick run (4096^2,
# 8192^2, 28672x8192, M 4/16/64) for 16/64 (16 and 32: the H200 entries below replaced them):
# M <= 16 (16, 64, 4, 1, 8, True, 4) 11.4-11.7 / 31.3-32.7 / 87.8-91.3 us (sum 266 us; (16, 128, ..., XPF 2): 270,
# the old table entry without prefetch: 320); M = 64 (64, 128, 8, 1, 0, True, 2) 15.9 / 50.7 / 175.1 us, best on all 3.
CONFIGS = {
    16: (16, 32, 1, 1, 0, False),  # H200 session 5 (--quick --mma2 --asym): one warp = mma.sync, both operands in
    # registers; M 2-16: 10.4-11.2 / 28.5-29.9 / 85.1-88.7 us vs (16, 64, 4, 1, 8, True, 4)'s 12.0-12.5 / 34.0-35.5 /
    # 97.0-101.1 (4096^2, 8192^2, 28672x8192)
    32: (32, 32, 1, 1, 0, False, 0, None, 1),  # H200 session 5 (--quick --wpf --asym): 14.3 / 39.5 / 126.8 us vs
    # the register-A (32, 64, 4, 1, 0, True, 2)'s 14.7 / 43.7 / 172.2 (M = 32)
    64: (64, 128, 8, 1, 0, True, 2),
    128: (128, 128, 8, 2, 0, False),
    256: (256, 128, 8, 1, 0, False),  # unpipelined (BM = 256 x 2 stages of x slot tiles does not fit in smem)
}
# auto split-K: programs wanted.  The REGA path has no pipelined loads (occupancy hides their latency: ~4 programs
# per SM of 132); the 16-bit path pipelines, and splits cost M * N atomics each: one wave.
SPLIT_TARGET_REGA = 512
SPLIT_TARGET = 128
# 1-warp programs (mma.sync, no pipelining either; kernel_notes.md "Prepared, not run"): ~16 warps per SM of 132
SPLIT_TARGET_ONE_WARP = 2048
OUTLIERS_FUSED = True  # epilogue add (1) vs the separate ELL launch (2); benchmarks/kernels_swap.py measures both
FUSED_MAX_BM = 32  # measured: fused wins at BM <= 32 (M = 16: 39 vs 64 us at 8192^2); at BM = 64 the separate
# launch wins (8192^2: 73.7 vs 91.0 us, the pipelined 16-bit config); BM = 128 spills (ptxas: 368 B of stack)
# fused outliers gather from x itself (no x^T copy launch, ~2-3 us) while the extra sectors that costs, N x R x
# (M - 1) of 32 bytes from L2, stay under this many.  H200 session 5, (16, 32, 1) + 0.5%: 4096^2 (86 k slots) M = 4 /
# 16 12.4 / 12.8 us from x vs 14.7 / 14.9 with x^T; 8192x28672 (1.2 M slots) M = 16 from x 170.1 vs 0% 105.9
GATHER_X_MAX_SECTORS = 1 << 21
GATHER_X_MAX_M = 16  # and never above this M
BR_ELEMS = 32  # outlier epilogue: gathered x elements per thread per step ([BN, BR, BM] tile), keeps it spill-free


def pick_config(m):
    for bucket in sorted(CONFIGS):
        if m <= bucket:
            return CONFIGS[bucket]
    return CONFIGS[max(CONFIGS)]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, TF32: tl.constexpr):
    if IEEE:  # float32 operands: full-precision products, not tf32
        return tl.dot(a, b, acc, input_precision="ieee")
    elif TF32:  # float32 operands holding fp16/bf16 values and small integers: tf32 products are exact
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _code3_sel(a, a_hi, hs, h_hi, h_15, j: tl.constexpr, ASM: tl.constexpr):
    """_code3 for the REGA path as float32 2**(23 - p) + c, in two LOP3s: a bit-select (bit p + 2 from the plane-1
    word, the rest from the plane-0 word: lo ^ ((lo ^ hi) & m)), then mask | magic.  The second is a unary inline
    asm (the hoist into the MMA operand layout accepts elementwise arith and unary asm only); ptxas makes three
    LOP3s of the plain (a & m) | (h & m2) | magic."""
    p: tl.constexpr = 2 * (j % 8)
    magic: tl.constexpr = (150 - p) << 23
    hm: tl.constexpr = 4 << p
    if j < 8:
        lo = a
        hi = hs
    elif j < 15:
        lo = a_hi
        hi = h_hi
    else:
        lo = a_hi
        hi = h_15
    sel = lo ^ ((lo ^ hi) & hm)
    if ASM:
        bits = tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {7 << p}, {magic}, 0xEA;", "=r,r", [sel],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (sel & (7 << p)) | magic
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _xload(x_cols, blk, j: tl.constexpr, q, K, mask_m, WPB: tl.constexpr):
    kx = blk * 256 + j * WPB + q
    return tl.load(x_cols + kx[:, None], mask=(kx < K)[:, None] & mask_m[None, :], other=0.0)


@triton.jit
def qgemm_swap_kernel(x_ptr, xt_ptr, y_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, b_ptr, oi_ptr, ov_ptr, hsh_ptr,
                      M, N, K, R, group_size, blocks_per_split,
                      stride_xm, stride_xt, stride_xtm, stride_ym, stride_p0, stride_p1, stride_s, stride_z, stride_oi,
                      stride_ov,
                      BITS: tl.constexpr, W0: tl.constexpr, ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUTLIERS: tl.constexpr,
                      INPLACE: tl.constexpr, ASM: tl.constexpr, IEEE: tl.constexpr, REGA: tl.constexpr,
                      SPLIT: tl.constexpr, ATOMIC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, XPF: tl.constexpr, XBK: tl.constexpr,
                      PIPE: tl.constexpr, WPF: tl.constexpr, ZLOAD: tl.constexpr):
    # GROUP_MODE 0: per channel; 1: groups of whole 256-column blocks; 2: per element
    PW: tl.constexpr = 32 // W0  # code slots per word
    # asymmetric on the REGA path: the loop sums (c - ZERO) x as for a symmetric grid (the unpack cannot take a
    # per-row [BN] zero, see the module doc); (z - ZERO) * sum_k x comes off after it (per split; per block in mode 1)
    XSUM: tl.constexpr = REGA and HAS_ZEROS
    WPB: tl.constexpr = 8 * W0  # plane-0 words per block = columns per slot = the dot's K
    offs_m, mask_m, offs_n, mask_n, split = tile_offsets(M, N, BM, BN)
    q = tl.arange(0, WPB)
    hcol = (q // 16) * 8 + (q % 8)  # 3-bit: the plane-1 word of each plane-0 word
    hsh = (q % 16) // 8
    # REGA: the weight tile stays float32 from the unpack to a tf32 dot (A in registers, see the module doc)
    dtype = tl.float32 if (IEEE or REGA) else x_ptr.dtype.element_ty
    if REGA and BITS == 3:  # the per-column plane-1 shift as a loaded tile (the hoist needs loads/constants)
        shift = tl.load(hsh_ptr + q[None, :] + offs_n[:, None] * 0)
    else:
        shift = hsh[None, :]
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if HAS_ZEROS and not XSUM:  # (XSUM: loaded after the loop, not held in registers through it)
        zn = tl.load(z_ptr + offs_n * stride_z, mask=mask_n, other=0).to(tl.float32)
    elif ZLOAD:  # symmetric, 1-warp: the zero as a uint8 load (times 0), as an asymmetric grid has it.  Triton
        # sizes the mma.sync operands' kWidth by the narrowest type feeding the weight tile: a uint8 gives 4 (x^T
        # fragments straight from registers), a constant 2 (x^T staged through shared memory: sm_90 AOT 38 vs 6
        # LDS/STS at (16, 16, 1); H200 8192^2 M = 4 42.3 vs 28.5 us).  z_ptr: any uint8 view, stride_z 0
        zn = tl.load(z_ptr + offs_n * stride_z, mask=mask_n, other=0).to(tl.float32) * 0.0 + ZERO
    else:
        zn = tl.full((BN,), ZERO, tl.float32)
    x_cols = x_ptr + offs_m[None, :] * stride_xm  # x^T tile [WPB, BM]: x read with strides, K along dim 0
    blk0 = split * blocks_per_split
    blk1 = min(blk0 + blocks_per_split, tl.cdiv(K, 256))
    if WPF:  # the next block's words are loaded one iteration ahead, into registers (no smem, no barrier)
        a_nx, h_nx = block_loads(p0_ptr, p1_ptr, offs_n, mask_n & (blk0 + offs_n * 0 < blk1), stride_p0,
                                 stride_p1, blk0, q, hcol, BITS, WPB)
    for blk in tl.range(blk0, blk1, num_stages=PIPE):
        if WPF:
            a, hs, a_hi, h_hi, h_15 = block_split(a_nx, h_nx, shift, BITS, INPLACE)
            a_nx, h_nx = block_loads(p0_ptr, p1_ptr, offs_n, mask_n & (blk + 1 + offs_n * 0 < blk1), stride_p0,
                                     stride_p1, blk + 1, q, hcol, BITS, WPB)
        else:
            a, hs, a_hi, h_hi, h_15 = block_words(p0_ptr, p1_ptr, offs_n, mask_n, stride_p0, stride_p1, blk, q,
                                                  hcol, shift, BITS, INPLACE, WPB)
        if GROUP_MODE == 1:
            sb, zb = block_grid(s_ptr, z_ptr, offs_n, mask_n, stride_s, stride_z, blk, group_size, HAS_ZEROS, ZERO,
                                BN)
            if ZLOAD:  # the loaded symmetric zero (see zn), not block_grid's constant
                zb = zn
            part = tl.zeros((BN, BM), dtype=tl.float32)
            if XSUM:  # the block's zero differs: its own x sum, from the slot tiles the loop loads anyway
                xa = tl.zeros((WPB, BM), dtype=tl.float32)
        else:
            zb = zn
            part = acc
        # x^T slot tiles are L2 reads on the per-slot critical path (load -> smem -> fence -> barrier -> wgmma):
        # XPF > 0 issues them XPF slots ahead (the first XPF together with the block's words)
        if XPF >= 1:
            xp0 = _xload(x_cols, blk, 0, q, K, mask_m, WPB)
        if XPF >= 2:
            xp1 = _xload(x_cols, blk, 1, q, K, mask_m, WPB)
        if XPF >= 3:
            xp2 = _xload(x_cols, blk, 2, q, K, mask_m, WPB)
        if XPF >= 4:
            xp3 = _xload(x_cols, blk, 3, q, K, mask_m, WPB)
        for j in tl.static_range(PW):
            kx = blk * 256 + j * WPB + q
            if XPF == 0:
                xj = _xload(x_cols, blk, j, q, K, mask_m, WPB)
            else:
                xj = xp0
                if XPF >= 2:
                    xp0 = xp1
                if XPF >= 3:
                    xp1 = xp2
                if XPF >= 4:
                    xp2 = xp3
                if j + XPF < PW:
                    if XPF == 1:
                        xp0 = _xload(x_cols, blk, j + XPF, q, K, mask_m, WPB)
                    elif XPF == 2:
                        xp1 = _xload(x_cols, blk, j + XPF, q, K, mask_m, WPB)
                    elif XPF == 3:
                        xp2 = _xload(x_cols, blk, j + XPF, q, K, mask_m, WPB)
                    else:
                        xp3 = _xload(x_cols, blk, j + XPF, q, K, mask_m, WPB)
            xj = xj.to(dtype)
            if XSUM and GROUP_MODE == 1:
                xa += xj
            if REGA:  # only elementwise ops on loaded tiles and constants between the loads and the dot
                if BITS == 3:
                    c = _code3_sel(a, a_hi, hs, h_hi, h_15, j, ASM) - (ZERO + (1 << (23 - 2 * (j % 8))))
                else:
                    c = ((a >> (W0 * j)) & ((1 << W0) - 1)).to(tl.float32) - ZERO
            else:
                c = slot_codes(a, a_hi, hs, h_hi, h_15, zb, j, BITS, W0, INPLACE, ASM)
            if GROUP_MODE == 2:
                c = group_dequant(c, zb, kx, offs_n, mask_n, K, group_size, s_ptr, z_ptr, stride_s, stride_z,
                                  HAS_ZEROS, ZERO)
            part = _dot(c.to(dtype), xj, part, IEEE, REGA)
        if GROUP_MODE == 1:
            if XSUM:
                part -= (zb - ZERO)[:, None] * tl.sum(xa, axis=0)[None, :]
            acc += part * sb[:, None]
        else:
            acc = part
    if GROUP_MODE == 0:
        if XSUM:  # per channel: sum this split's x range in a second pass over x (L2-resident) after the loop, in
            # [BM, XBK] tiles, 2 loads in flight; summing the slot tiles inside the loop instead costs 20-40
            # registers with XPF (fewer programs per SM), and so does holding z or the sum through the loop
            zn = tl.load(z_ptr + offs_n * stride_z, mask=mask_n, other=0).to(tl.float32)
            xt = tl.zeros((BM, XBK), dtype=tl.float32)
            k_hi = min(blk1 * 256, K)
            for k0 in tl.range(blk0 * 256, k_hi, XBK, loop_unroll_factor=2):
                kk = k0 + tl.arange(0, XBK)
                xt += tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                              mask=mask_m[:, None] & (kk < k_hi)[None, :], other=0.0).to(tl.float32)
            acc -= (zn - ZERO)[:, None] * tl.sum(xt, axis=1)[None, :]
        s = tl.load(s_ptr + offs_n * stride_s, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if OUTLIERS == 1:
        acc = add_outliers(acc, xt_ptr, oi_ptr, ov_ptr, offs_n, mask_n, offs_m, mask_m, R, split, stride_xt,
                           stride_xtm, stride_oi, stride_ov, BR)
    store_tile(acc, y_ptr, offs_n, mask_n, offs_m, mask_m, stride_ym, SPLIT, ATOMIC)


@triton.jit
def tile_offsets(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """This program's token rows (offs_m, mask_m), weight rows (offs_n, mask_n) and K split of a swap-AB grid
    (axis 0: weight tiles x M tiles, axis 1: splits)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m  # M tiles of one weight tile run side by side: the weight comes from DRAM once
    pid_n = pid // num_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    return offs_m, offs_m < M, offs_n, offs_n < N, tl.program_id(1)


@triton.jit
def split_slots(R, split, parts=None):
    """Outlier slots [r_lo, r_hi) of part `split` of `parts` (default: the grid's splits): R / parts each."""
    rps = tl.cdiv(R, tl.num_programs(1) if parts is None else parts)
    return split * rps, min(split * rps + rps, R)


@triton.jit
def add_outliers(acc, xt_ptr, oi_ptr, ov_ptr, offs_n, mask_n, offs_m, mask_m, R, split, stride_xt, stride_xtm,
                 stride_oi, stride_ov, BR: tl.constexpr, parts=None, skip=0):
    """acc [BN, BM] += val[n, r] * x^T[idx[n, r], :], BR slots at a time; part `split` of `parts` (default: the
    grid's splits) takes slots split R / parts .. (less its first `skip`, added elsewhere)."""
    r_lo, r_hi = split_slots(R, split, parts)
    for r0 in range(r_lo + skip, r_hi, BR):
        acc += slot_sums(xt_ptr, oi_ptr, ov_ptr, offs_n, mask_n, r0 + tl.arange(0, BR), r_hi, offs_m, mask_m,
                         stride_xt, stride_xtm, stride_oi, stride_ov)
    return acc


@triton.jit
def store_tile(acc, y_ptr, offs_n, mask_n, offs_m, mask_m, stride_ym, SPLIT: tl.constexpr, ATOMIC: tl.constexpr):
    """y^T tile acc [BN, BM] -> y [M, N]: stored, or (split-K) added with atomics in y's dtype."""
    if SPLIT:
        add_tile(acc, y_ptr, offs_n, mask_n, offs_m, mask_m, stride_ym, ATOMIC)
    else:
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_m[None, :])


def group_mode(group_size):
    if group_size == -1:
        return 0
    return 1 if group_size % 256 == 0 else 2


def pick_gather_x(m, n, r):
    """Fused outliers read x itself (no x^T copy) when the extra L2 sectors that costs are few."""
    return r > 0 and m <= GATHER_X_MAX_M and n * r * (m - 1) <= GATHER_X_MAX_SECTORS


def needs_xt(m, n, r, gather_x=None):
    """True when the fused outlier epilogue for r slots per row gathers from an x^T copy rather than from x itself
    (gather_x: the caller's choice; None: pick_gather_x)."""
    return r > 0 and not (pick_gather_x(m, n, r) if gather_x is None else gather_x)


def epilogue_x(x, n, r, gather_x=None):
    """What the fused outlier epilogue (add_outliers) gathers from, with its (k, m) strides, for r slots per row: x
    itself (r = 0, or where pick_gather_x finds the extra sectors few: M sectors per slot, no copy) or an x^T copy
    made here (one BM-contiguous sector per slot, one more launch)."""
    if not needs_xt(x.shape[0], n, r, gather_x):
        return x, 1, x.stride(0)
    xt = x.t().contiguous()
    return xt, xt.stride(0), 1


def epilogue_br(warps, bm, bn):
    """Outlier slots per add_outliers step: about BR_ELEMS gathered x elements per thread (spill-free)."""
    return max(1, min(8, triton.next_power_of_2(BR_ELEMS * 32 * warps // (bm * bn) + 1) // 2))


def split_blocks(k, split):
    """(splits, 256-column blocks per split) for a requested split of K, none of them empty."""
    blocks = triton.cdiv(k, 256)
    bps = triton.cdiv(blocks, split)
    return triton.cdiv(blocks, bps), bps


def pick_split(m, n, k, bm, bn, target):
    """Splits of K (powers of 2, at most 8, each >= 2 blocks of 256) until there are >= target programs."""
    programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    blocks = triton.cdiv(k, 256)
    split = 1
    while programs * split < target and split < 8 and blocks // (split * 2) >= 2:
        split *= 2
    return split


_HSH = {}


def _hsh_table(device):
    """int32 [16]: the plane-1 shift of each of the 16 plane-0 words of a 3-bit block (q // 8).  Made once per
    device with a kernel (torch.arange), not a host copy, so that a first call inside CUDA-graph capture works."""
    t = _HSH.get(device)
    if t is None:
        t = _HSH[device] = torch.arange(16, device=device, dtype=torch.int32) // 8
    return t


def rega_ok(p, x):
    """The tf32 register-A path: fp16/bf16 x, per channel or groups of whole blocks, symmetric or asymmetric."""
    return x.dtype in (torch.float16, torch.bfloat16) and group_mode(p["group_size"]) != 2


def qgemm_swap(x, p, bias, out, config=None, outliers_fused=None, inplace=True, asm=True, gather_x=None):
    """x [M, K] (stride(1) == 1), prepared dict p, bias [N] | None, out [M, N] -> out (same contract as
    gemm.qgemm).  config = (BM, BN, num_warps, num_stages, SPLIT_K, REGA[, XPF[, PIPE[, WPF]]]) overrides the table
    (SPLIT_K 0: auto; REGA falls back to the 16-bit A path where rega_ok is False; XPF: x slot tiles loaded that
    many slots ahead, 0..4; PIPE: the REGA path's K loop software-pipelined that deep by triton -- words and x slot
    tiles as cp.async copies into shared memory, the unpacked weight still the register A operand -- None: off;
    WPF: the next block's plane words loaded one iteration ahead into registers -- for the 1-warp mma.sync
    configs, which have no pipelining; measured faster at BM 32, not at BM 16, where ptxas sinks those loads to the
    end of the loop body)."""
    m, k = x.shape
    n = p["out_features"]
    cfg = tuple(config or pick_config(m))
    bm, bn, warps, stages, split, rega = cfg[:6]
    xpf = cfg[6] if len(cfg) > 6 else 0
    pipe = cfg[7] if len(cfg) > 7 else None
    wpf = bool(cfg[8]) if len(cfg) > 8 else False
    rega = rega and rega_ok(p, x)
    if rega:
        # the launch-wide pipeliner moves the unpack back in front of a shared-memory round trip; a depth on the
        # K loop itself (PIPE) keeps the register-A operand (sm_90 AOT: 32 / 32 HGMMA with register A)
        stages = 1
    else:
        pipe = None
    if pipe is not None and (pipe < 2 or xpf):
        raise QuantEaseError(f"swap GEMM PIPE={pipe!r}: a depth >= 2, with XPF 0 (the pipeliner loads x ahead)")
    on_cuda = x.is_cuda
    if split == 0:
        target = SPLIT_TARGET_REGA if rega else (SPLIT_TARGET_ONE_WARP if warps == 1 else SPLIT_TARGET)
        split = pick_split(m, n, k, bm, bn, target) if x.dtype != torch.float32 else 1
    split, bps = split_blocks(k, split)
    bits = p["bits"]
    mode = group_mode(p["group_size"])
    plane1 = p["plane1"] if p["plane1"] is not None else p["plane0"]
    zeros, oi, ov = p["zeros"], p["outlier_idx"], p["outlier_val"]
    fused = (OUTLIERS_FUSED if outliers_fused is None else outliers_fused) and bm <= FUSED_MAX_BM
    outliers = 0 if oi is None else (1 if fused else 2)
    xt, sxt, sxtm = epilogue_x(x, n, oi.shape[1] if outliers == 1 else 0, gather_x)
    zload = warps == 1 and not rega and zeros is None
    zptr = p["plane0"].view(torch.uint8) if zload else p["scales"]  # ZLOAD reads it with stride 0 (see the kernel)
    hsh = _hsh_table(x.device) if rega and bits == 3 else p["plane0"]
    if split > 1:
        out.zero_()
    # asym x-sum pass: [BM, XBK] x tiles of 1024 / (acc elements per thread): no more registers than the K loop
    # (sm_90 AOT: 80 at (16, 64, 4), 128 at (16, 128, 4), 123 at (64, 128, 8), as symmetric)
    xbk = max(64, min(1024, 1024 * 32 * warps // (bm * bn)))
    br = epilogue_br(warps, bm, bn)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    qgemm_swap_kernel[grid](
        x, xt, out, p["plane0"], plane1, p["scales"], zeros if zeros is not None else zptr,
        bias if bias is not None else p["scales"], oi if oi is not None else p["plane0"],
        ov if ov is not None else p["scales"], hsh,
        m, n, k, oi.shape[1] if oi is not None else 0, p["group_size"], bps,
        x.stride(0), sxt, sxtm, out.stride(0), p["plane0"].stride(0), plane1.stride(0), p["scales"].stride(0),
        zeros.stride(0) if zeros is not None else 0, oi.stride(0) if oi is not None else 0,
        ov.stride(0) if ov is not None else 0,
        BITS=bits, W0=2 if bits == 3 else bits, ZERO=2 ** (bits - 1), HAS_ZEROS=zeros is not None,
        GROUP_MODE=mode, HAS_BIAS=bias is not None, OUTLIERS=outliers,
        INPLACE=inplace and bits == 3 and mode != 2, ASM=asm and on_cuda,
        IEEE=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not on_cuda and not rega), REGA=rega,
        SPLIT=split > 1, ATOMIC=on_cuda, BM=bm, BN=bn, BR=br, XPF=xpf, XBK=xbk, PIPE=pipe, WPF=wpf, ZLOAD=zload,
        num_warps=warps,
        num_stages=stages)
    if outliers == 2:
        ell_add(x, oi, ov, out)
    return out
