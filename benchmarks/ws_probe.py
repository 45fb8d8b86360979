"""Device probe (session 14, not yet run): the ceiling of a warp-specialized M = 1 kernel on the half2 words.

Session 4 left warp specialization -- producer warps streaming the words into shared memory, consumer warps
unpacking them -- as the design that could lift the M = 1 GEMV (8192^2: 14.1 us on the H100 = 1.79 TB/s of words,
against a load-only probe's ~10 us and the 7.5 us the 25 MB take at 3.35 TB/s).  Triton's automatic warp
specialization fails to compile gemm_half2's loop (kernel_notes session 14), so it would be a hand-written Gluon
kernel.  Before writing it, this measures what its memory side can reach: a Gluon kernel whose producer warp feeds a
ring of STAGES shared-memory slots by TMA (one copy per role: the words viewed [N, blocks, 24], boxes [BN, BKB, 8])
and whose consumer warps only load each slot into registers and fold it (xor) -- every word read once, no math.
Then the same ring with the GEMV's math in the consumer warps (gemv_kernel: gemm_half2's LOP3 + HSUB2 decode on
whole int32 words, HFMA2 against the x pairs, an fp32 flush per block; per channel, asymmetric; the ELL outliers
gathered by two more warps while the others stream and unpack, their sums added by atomics): the first
warp-specialized GEMV, checked against the default GEMV's output.  If the stream is well under the GEMV's 14.1 us at
8192^2 and gemv_kernel is close to the stream, this is the road for M = 1; if the stream itself is no faster, the
GEMV's gap is not where session 4 put it.

    export PYTHONPATH=$PWD; python3 benchmarks/ws_probe.py [--out $OUT]          # H100 / H200, triton >= 3.6
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/ws_probe.py --aot             # here: sm_90 compiles, no GPU

Per shape: fp16 F.linear, each stream config (its xor checked first against xor_rows': the word stream is complete),
then at 0% and 0.5% outliers the default M = 1 GEMV (qgemv_half2) and each gemv_kernel config (its y checked first
against the GEMV's), as CUDA-graph medians over rotated copies (L2 cold; kernels.py's helpers).  Gluon kernels do
not run under TRITON_INTERPRET, so there is no CPU mode; `sm_90 AOT` below means --aot (compiled here with triton
3.6), not run.
"""
import argparse
import csv
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402

SHAPES = ((8192, 8192), (28672, 8192), (4096, 4096), (8192, 28672))
# (BN rows, BKB blocks per slot, STAGES, consumer warps): a slot is 3 x BN x BKB x 32 bytes (24 KB at (64, 4)); the
# K splits are chosen so that one wave of programs fills the SMs' shared memory.  sm_90 AOT here (triton 3.6, maxnreg
# 128): all five compile, 3 UTMALDG per slot, 96-144 KB of shared memory
CONFIGS = ((64, 4, 4, 4), (128, 4, 3, 4), (64, 8, 3, 4), (32, 8, 4, 4), (128, 2, 6, 8))
# gemv_kernel (the same ring, the GEMV's math in the consumer warps).  A thread holds BN / ((32 / BKB) x warps) rows
# of its (block, q) column run -- 1 / 2 / 1 / 4 / 4 below -- and loads their x pairs once, so the x bytes read from
# L1 per byte of words are 5.3 / 2.7 / 5.3 / 1.3 / 1.3.  sm_90 AOT: all at 128 registers, no stack; 37-43 LDG per slot
# (with the outlier warps: +12-24 LDG, and the two 4-rows-a-thread configs spill 120 B)
GEMV_CONFIGS = ((32, 4, 4, 4), (64, 4, 4, 4), (64, 2, 6, 4), (128, 4, 3, 4), (64, 8, 2, 4))
SMEM = 220 * 1024  # usable shared memory per SM (H100 / H200: 227 KB), less the barriers' and the runtime's share


@gluon.jit
def _load_partition(w_desc, r0, r1, r2, ready, empty, n0, b0, nk, BKB: gl.constexpr):
    """One warp: for each slot of the ring, wait until the consumers freed it, then three TMA copies (the roles)."""
    stages: gl.constexpr = r0.type.shape[0]
    for i in range(nk):
        s = i % stages
        mbarrier.wait(empty.index(s), ((i // stages) & 1) ^ 1)  # a fresh barrier passes phase 1: the ring starts empty
        mbarrier.expect(ready.index(s), 3 * w_desc.block_type.nbytes)
        b = b0 + i * BKB
        tma.async_copy_global_to_shared(w_desc, [n0, b, 0], ready.index(s), r0.index(s))
        tma.async_copy_global_to_shared(w_desc, [n0, b, 8], ready.index(s), r1.index(s))
        tma.async_copy_global_to_shared(w_desc, [n0, b, 16], ready.index(s), r2.index(s))


@gluon.jit
def _fold_partition(r0, r1, r2, ready, empty, nk, BN: gl.constexpr, BKB: gl.constexpr, layout: gl.constexpr):
    """The default partition: each slot's three role tiles into registers, folded by xor (what the GEMV would
    unpack), the slot handed back."""
    stages: gl.constexpr = r0.type.shape[0]
    acc = gl.zeros([BN, BKB, 8], gl.int32, layout)
    for i in range(nk):
        s = i % stages
        mbarrier.wait(ready.index(s), (i // stages) & 1)
        acc = acc ^ r0.index(s).load(layout) ^ r1.index(s).load(layout) ^ r2.index(s).load(layout)
        fence_async_shared()  # the loads above before the producer's next TMA into this slot
        mbarrier.arrive(empty.index(s), count=1)
    return (acc, )


@gluon.jit
def _ring(w_desc, blocks_per_split, nblocks, STAGES: gl.constexpr):
    """The program's ring (three role buffers of STAGES slots, ready / empty barriers initialized), its first row
    n0, first block b0 and number of slots to stream nk."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKB: gl.constexpr = w_desc.block_type.shape[1]
    shape: gl.constexpr = [STAGES] + w_desc.block_type.shape
    r0 = gl.allocate_shared_memory(gl.int32, shape, w_desc.layout)
    r1 = gl.allocate_shared_memory(gl.int32, shape, w_desc.layout)
    r2 = gl.allocate_shared_memory(gl.int32, shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    n0 = gl.program_id(0) * BN
    b0 = gl.program_id(1) * blocks_per_split
    nk = gl.cdiv(gl.minimum(blocks_per_split, nblocks - b0), BKB)
    return r0, r1, r2, ready, empty, n0, b0, nk


@gluon.jit
def stream_kernel(w_desc, out_ptr, N, blocks_per_split, nblocks, STAGES: gl.constexpr, num_warps: gl.constexpr):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKB: gl.constexpr = w_desc.block_type.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 1, 8], [32 // BKB, BKB, 1], [num_warps, 1, 1], [2, 1, 0])
    r0, r1, r2, ready, empty, n0, b0, nk = _ring(w_desc, blocks_per_split, nblocks, STAGES)
    acc, = gl.warp_specialize([(_fold_partition, (r0, r1, r2, ready, empty, nk, BN, BKB, layout)),
                               (_load_partition, (w_desc, r0, r1, r2, ready, empty, n0, b0, nk, BKB))], [1], [24])
    row = gl.xor_sum(gl.xor_sum(acc, axis=2), axis=1)
    offs = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    gl.atomic_xor(out_ptr + offs, row, mask=offs < N)


# The GEMV's consumer (fp16 x, per-channel asymmetric codes): gemm_half2._slot / _spare's PTX on whole int32 words
# (both 16-bit lanes: the pair of columns 16 s + 2 q, + 1 of slot s), HFMA2 into a half2 accumulator that is flushed
# into fp32 after each block's 16 slots (gemv_half2's 16-product chain)
_SPARE = gl.constexpr(
    "{ .reg .b32 a, b, c, t; shr.b32 a, $2, 15; shr.b32 b, $3, 14; shr.b32 c, $4, 13; "
    f"lop3.b32 t, a, 0x00010001, {(25 << 10) * 0x10001}, 0xEA; lop3.b32 t, b, 0x00020002, t, 0xEA; "
    "lop3.b32 t, c, 0x00040004, t, 0xEA; sub.f16x2 $0, t, $1; }")
_FMA2 = gl.constexpr("fma.rn.f16x2 $0, $1, $2, $3;")
_FLUSH = gl.constexpr(
    "{ .reg .b16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; cvt.f32.f16 b, h; add.f32 $0, a, b; }")


@gluon.jit
def _code(w, sub, j: gl.constexpr):
    """Slot j (0..4) of a role tile of int32 words -> (code - z) as f16x2 bits (int32)."""
    p: gl.constexpr = 3 * j if 3 * j + 3 <= 10 else 0
    sh: gl.constexpr = 3 * j - p
    mask: gl.constexpr = (7 << p) * 0x10001
    magic: gl.constexpr = ((25 - p) << 10) * 0x10001
    return gl.inline_asm_elementwise(
        f"{{ .reg .b32 t; shr.b32 t, $2, {sh}; lop3.b32 t, t, {mask}, {magic}, 0xEA; sub.f16x2 $0, t, $1; }}",
        "=r,r,r", [sub, w], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _sub(s0, s3, s6, j: gl.constexpr):
    """The 2**e + z constant of slot j's bit position (_code's p)."""
    if j == 1:
        return s3
    elif j == 2:
        return s6
    else:
        return s0


@gluon.jit
def _fma2(d, x, acc):
    return gl.inline_asm_elementwise(_FMA2, "=r,r,r,r", [d, x, acc], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _gemv_partition(r0, r1, r2, ready, empty, nk, x_ptr, z_ptr, n0, b0, N, BN: gl.constexpr, BKB: gl.constexpr,
                    layout: gl.constexpr):
    """The default partition of gemv_kernel: for each slot of the ring, its 16 code slots per block against the
    x pairs (int32 view of x: pair 128 b + 8 s + q), half2 products, one fp32 flush per block."""
    stages: gl.constexpr = r0.type.shape[0]
    rows: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, layout))
    offs_n = n0 + gl.arange(0, BN, layout=rows)
    z = gl.load(z_ptr + offs_n, mask=offs_n < N, other=0).to(gl.int32)
    z3 = gl.expand_dims(gl.expand_dims(z, 1), 2)
    s0 = ((25 << 10) | z3) * 0x10001  # 2**e + z at bit p = 0 / 3 / 6 (gemm_half2._subs), both lanes
    s3 = ((22 << 10) | (z3 << 3)) * 0x10001
    s6 = ((19 << 10) | (z3 << 6)) * 0x10001
    xl: gl.constexpr = gl.SliceLayout(0, layout)
    blk = gl.expand_dims(gl.arange(0, BKB, layout=gl.SliceLayout(1, xl)), 1)
    q = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, xl)), 0)
    acc = gl.zeros([BN, BKB, 8], gl.float32, layout)
    for i in range(nk):
        st = i % stages
        mbarrier.wait(ready.index(st), (i // stages) & 1)
        w0 = r0.index(st).load(layout)
        w1 = r1.index(st).load(layout)
        w2 = r2.index(st).load(layout)
        fence_async_shared()
        mbarrier.arrive(empty.index(st), count=1)
        xrow = x_ptr + (b0 + i * BKB + blk) * 128 + q
        h = gl.zeros([BN, BKB, 8], gl.int32, layout)
        for s in gl.static_range(16):
            xs = gl.expand_dims(gl.load(xrow + 8 * s), 0)
            if s < 5:
                d = _code(w0, _sub(s0, s3, s6, s % 5), s % 5)
            elif s < 10:
                d = _code(w1, _sub(s0, s3, s6, s % 5), s % 5)
            elif s < 15:
                d = _code(w2, _sub(s0, s3, s6, s % 5), s % 5)
            else:
                d = gl.inline_asm_elementwise(_SPARE, "=r,r,r,r,r", [s0, w0, w1, w2], dtype=gl.int32,
                                              is_pure=True, pack=1)
            h = _fma2(d, xs, h)
        acc += gl.inline_asm_elementwise(_FLUSH, "=r,r", [h], dtype=gl.float32, is_pure=True, pack=1)
    return (acc, )


@gluon.jit
def _outlier_partition(oi_ptr, ov_ptr, x_ptr, y_ptr, n0, N, R, stride_o, BN: gl.constexpr, RS: gl.constexpr):
    """Worker warps beside the stream: this program's rows' outlier slots (the K split's share), RS at a time,
    gathered from x (fp16) while the consumers unpack the words; the sums go to y by atomics, unscaled (H is not on
    the grid) -- the outliers cost gathers in parallel with the loop instead of a chain after it."""
    layout: gl.constexpr = gl.BlockedLayout([1, RS], [32, 1], [gl.num_warps(), 1], [1, 0])
    offs_n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
    split = gl.program_id(1)
    r_lo = split * R // gl.num_programs(1)
    r_hi = (split + 1) * R // gl.num_programs(1)
    rows = gl.expand_dims(offs_n, 1)
    acc = gl.zeros([BN], gl.float32, gl.SliceLayout(1, layout))
    for r in range(r_lo, r_hi, RS):
        slots = gl.expand_dims(r + gl.arange(0, RS, layout=gl.SliceLayout(0, layout)), 0)
        m = (rows < N) & (slots < r_hi)
        idx = gl.load(oi_ptr + rows * stride_o + slots, mask=m, other=0).to(gl.int32)
        val = gl.load(ov_ptr + rows * stride_o + slots, mask=m, other=0.0).to(gl.float32)
        acc += gl.sum(val * gl.load(x_ptr + idx, mask=m, other=0.0).to(gl.float32), axis=1)
    gl.atomic_add(y_ptr + offs_n, acc, mask=offs_n < N)


@gluon.jit
def gemv_kernel(w_desc, x_ptr, x16_ptr, s_ptr, z_ptr, oi_ptr, ov_ptr, y_ptr, N, R, stride_o, blocks_per_split,
                nblocks, STAGES: gl.constexpr, OUTLIERS: gl.constexpr, num_warps: gl.constexpr):
    """y [N] fp32 += s * (codes - z) @ x (+ H @ x) for M = 1 (x [K] fp16 -- x_ptr its int32 view, x16_ptr itself --
    K a multiple of 256; y zeroed by the caller): the words through the TMA ring of stream_kernel, the math of
    gemv_half2 in the consumer warps, the ELL outliers (idx / val [N, R], row stride stride_o) in 2 more warps."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKB: gl.constexpr = w_desc.block_type.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 1, 8], [32 // BKB, BKB, 1], [num_warps, 1, 1], [2, 1, 0])
    r0, r1, r2, ready, empty, n0, b0, nk = _ring(w_desc, blocks_per_split, nblocks, STAGES)
    if OUTLIERS:  # (a partition's (function, args) pair is written out in each call: not a value triton keeps)
        acc, = gl.warp_specialize(
            [(_gemv_partition, (r0, r1, r2, ready, empty, nk, x_ptr, z_ptr, n0, b0, N, BN, BKB, layout)),
             (_load_partition, (w_desc, r0, r1, r2, ready, empty, n0, b0, nk, BKB)),
             (_outlier_partition, (oi_ptr, ov_ptr, x16_ptr, y_ptr, n0, N, R, stride_o, BN, 4))], [1, 2], [24, 64])
    else:
        acc, = gl.warp_specialize(
            [(_gemv_partition, (r0, r1, r2, ready, empty, nk, x_ptr, z_ptr, n0, b0, N, BN, BKB, layout)),
             (_load_partition, (w_desc, r0, r1, r2, ready, empty, n0, b0, nk, BKB))], [1], [24])
    row = gl.sum(gl.sum(acc, axis=2), axis=1)
    offs = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    scale = gl.load(s_ptr + offs, mask=offs < N, other=0.0).to(gl.float32)
    gl.atomic_add(y_ptr + offs, row * scale, mask=offs < N)


def descriptor(words, config):
    """The TMA descriptor of the words [N, blocks * 24] int32 viewed [N, blocks, 24], boxes [BN, BKB, 8]."""
    bn, bkb = config[:2]
    n = words.shape[0]
    w3 = words.view(n, -1, 24)
    box = [bn, bkb, 8]
    return TensorDescriptor(w3, list(w3.shape), list(w3.stride()), box,
                            gl.NVMMASharedLayout.get_default_for(box, gl.int32))


def stream(words, config, out, desc=None):
    """out [N] int32 ^= the xor of each row's words, read through the ring (out is not zeroed here: a fill
    kernel per call would be timed with it)."""
    bn, bkb, stages, warps = config
    n, nblocks = words.shape[0], words.shape[1] // 24
    per = split_for(n, nblocks, config, words.device)
    stream_kernel[(triton.cdiv(n, bn), triton.cdiv(nblocks, per))](
        desc or descriptor(words, config), out, n, per, nblocks, STAGES=stages, num_warps=warps, maxnreg=128)
    return out


def xor_rows(words):
    """Each row's xor of its int32 words, by torch (halving the width; an odd last column folded in first)."""
    w = words
    while w.shape[1] > 1:
        if w.shape[1] % 2:
            w = torch.cat([w[:, :1] ^ w[:, -1:], w[:, 1:-1]], dim=1)
        half = w.shape[1] // 2
        w = w[:, :half] ^ w[:, half:]
    return w[:, 0]


def split_for(n, nblocks, config, device):
    """Blocks per K split (a multiple of BKB) so that one wave of programs fills the SMs' shared memory."""
    bn, bkb, stages = config[:3]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_sm = max(1, SMEM // (3 * stages * bn * bkb * 32))  # programs whose rings fit an SM's shared memory at once
    split = max(1, min(nblocks // bkb, per_sm * sms // triton.cdiv(n, bn)))
    return triton.cdiv(triton.cdiv(nblocks, split), bkb) * bkb


def ws_gemv(x, p, config, y, desc=None):
    """y [N] fp32 += the layer's (per channel, asymmetric, outliers or none) product with x [1, K] fp16 (K a
    multiple of 256) by gemv_kernel; y is not zeroed here (see stream)."""
    bn, bkb, stages, warps = config
    words = p["words"].view(torch.int32).view(p["out_features"], -1)
    n, nblocks = words.shape[0], words.shape[1] // 24
    per = split_for(n, nblocks, config, words.device)
    oi, ov = p["outlier_idx"], p["outlier_val"]
    gemv_kernel[(triton.cdiv(n, bn), triton.cdiv(nblocks, per))](
        desc or descriptor(words, config), x.view(torch.int32), x, p["scales"], p["zeros"],
        oi if oi is not None else y, ov if ov is not None else y, y, n, 0 if oi is None else oi.shape[1],
        0 if oi is None else oi.stride(0), per, nblocks, STAGES=stages, OUTLIERS=oi is not None, num_warps=warps,
        maxnreg=128)
    return y


class Rows:
    """OUT/ws_probe.csv, each row written and flushed as it comes (a kernel that hangs leaves the rows before it)."""

    def __init__(self, out):
        self.f = None
        if out:
            os.makedirs(out, exist_ok=True)
            self.f = open(os.path.join(out, "ws_probe.csv"), "w", newline="")
            self.w = csv.writer(self.f)
            self.append(["n", "k", "fraction", "kernel", "config", "us", "words_tb_s", "fp16_us", "ok"])

    def append(self, row):
        if self.f:
            self.w.writerow(row)
            self.f.flush()


def gemv_rows(p, fraction, base, mb, rows):
    """The default GEMV and each gemv_kernel config on the prepared layer p (y checked against the GEMV's first),
    timed; rows of the CSV appended."""
    from quantease.kernels import gemv_half2

    n, k = p["out_features"], p["in_features"]
    gemv = kb.time_kernel(p, 1, lambda x, q, o: gemv_half2.qgemv_half2(x, gemv_half2.cached_layout(q), None, o))
    print(f"  {fraction:.1%} outliers: GEMV {gemv:.1f} us ({mb / gemv:.2f} TB/s, {base / gemv:.2f}x fp16)", flush=True)
    rows.append([n, k, fraction, "gemv_half2", "", f"{gemv:.2f}", f"{mb / gemv:.3f}", f"{base:.2f}", ""])
    x = torch.randn(1, k, device="cuda").half()
    y0 = gemv_half2.qgemv_half2(x, gemv_half2.cached_layout(p), None, torch.empty(1, n, device="cuda").half())
    y = torch.empty(n, device="cuda")
    for cfg in GEMV_CONFIGS:
        if n % cfg[0] or (k // 256) % cfg[1]:
            continue
        err = ((ws_gemv(x, p, cfg, y.zero_()).double() - y0.double()[0]).norm() / y0.double().norm()).item()
        us = kb.time_kernel(p, 1, lambda xx, q, o, c=cfg: ws_gemv(xx, q, c, y))
        ok = err < 3e-3  # fp16 outputs (the GEMV) against fp32 ones: ~3e-4; a wrong word or x mapping: ~1
        print(f"  ws_gemv {cfg}: {'ok' if ok else 'WRONG'} (relative {err:.1e} to the GEMV) {us:.1f} us "
              f"({mb / us:.2f} TB/s, {base / us:.2f}x fp16)", flush=True)
        rows.append([n, k, fraction, "ws_gemv", str(cfg), f"{us:.2f}", f"{mb / us:.3f}", f"{base:.2f}", ok])


def aot():
    """--aot: every kernel and config compiled for sm_90 here, without a GPU (PYTHONPATH=/tmp/t36: the device's triton
    3.6, as benchmarks/sass.py), with its registers, stack and shared memory -- what the notes quote."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from sass import disassemble

    ptrs = dict(out_ptr="*i32", x_ptr="*i32", x16_ptr="*fp16", s_ptr="*fp16", z_ptr="*i16", oi_ptr="*i16",
                ov_ptr="*fp16", y_ptr="*fp32")
    runs = [(stream_kernel, cfg, {}) for cfg in CONFIGS]
    runs += [(gemv_kernel, cfg, {"OUTLIERS": o}) for cfg in GEMV_CONFIGS for o in (False, True)]
    for fn, cfg, extra in runs:
        consts = dict(extra, STAGES=cfg[2], num_warps=cfg[3])
        desc = descriptor(torch.zeros(cfg[0], cfg[1] * 24, dtype=torch.int32), cfg)  # a CPU tensor: metadata only
        sig = {a: "constexpr" if a in consts else (mangle_type(desc) if a == "w_desc" else ptrs.get(a, "i32"))
               for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")}
        src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()},
                             attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg[3], maxnreg=128))
        sass, usage = disassemble(k.asm["cubin"])
        print(fn.__name__, cfg, extra or "", usage, f"shared {k.metadata.shared}", f"LDG {sass.count('LDG')}",
              f"UTMALDG {sass.count('UTMALDG')}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for ws_probe.csv")
    ap.add_argument("--aot", action="store_true", help="compile every kernel for sm_90 here (no GPU), print its "
                    "registers; PYTHONPATH=/tmp/t36 (triton 3.6)")
    args = ap.parse_args()
    if args.aot:
        return aot()
    rows = Rows(args.out)
    fp16 = {}
    for n, k in SHAPES:
        p = kb.make_prepared(n, k, 3, -1, 0.0, asym=True)
        words = p["words"].view(torch.int32).view(n, -1)
        want = xor_rows(words)
        out = torch.empty(n, dtype=torch.int32, device="cuda")
        base = kb.time_fp16(n, k, 1, fp16)
        mb = words.numel() * 4 / 1e6
        print(f"{n}x{k}: {mb:.1f} MB of words; fp16 {base:.1f} us", flush=True)
        for cfg in CONFIGS:
            if n % cfg[0] or (k // 256) % cfg[1]:
                continue
            ok = bool((stream(words, cfg, out.zero_()) == want).all())
            copies = [words] + [words.clone() for _ in range(kb.n_copies(words.numel() * 4) - 1)]
            descs = [descriptor(w, cfg) for w in copies]
            us = kb.graph_time([lambda w=w, d=d: stream(w, cfg, out, d) for w, d in zip(copies, descs)])
            del copies, descs
            print(f"  stream {cfg}: {'ok' if ok else 'WRONG xor'} {us:.1f} us ({mb / us:.2f} TB/s)", flush=True)
            rows.append([n, k, 0.0, "stream", str(cfg), f"{us:.2f}", f"{mb / us:.3f}", f"{base:.2f}", ok])
        gemv_rows(p, 0.0, base, mb, rows)
        del p, words
        gemv_rows(kb.make_prepared(n, k, 3, -1, 0.005, asym=True), 0.005, base, mb, rows)


if __name__ == "__main__":
    main()
