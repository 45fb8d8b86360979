"""Device probe (session 14, not yet run): the ceiling of a warp-specialized M = 1 kernel on the half2 words.

Session 4 left warp specialization -- producer warps streaming the words into shared memory, consumer warps
unpacking them -- as the design that could lift the M = 1 GEMV (8192^2: 14.1 us on the H100 = 1.79 TB/s of words,
against a load-only probe's ~10 us and the 7.5 us the 25 MB take at 3.35 TB/s).  Triton's automatic warp
specialization fails to compile gemm_half2's loop (kernel_notes session 14), so it would be a hand-written Gluon
kernel.  Before writing it, this measures what its memory side can reach: a Gluon kernel whose producer warp feeds a
ring of STAGES shared-memory slots by TMA (one copy per role: the words viewed [N, blocks, 24], boxes [BN, BKB, 8])
and whose consumer warps only load each slot into registers and fold it (xor) -- every word read once, no math.
If it streams 8192^2 in well under the GEMV's 14.1 us, the full kernel (the consumer unpacking with gemv_half2's
LOP3 + HFMA2 and the x pairs) is worth writing; if not, the GEMV's gap is not where session 4 put it.

    export PYTHONPATH=$PWD; python3 benchmarks/ws_probe.py [--out $OUT]          # H100 / H200, triton >= 3.6

First checks every config's xor against numpy's (the word stream is complete), then times, per shape: fp16
F.linear, the default M = 1 GEMV (qgemv_half2) and each config, as CUDA-graph medians over rotated copies (L2 cold;
kernels.py's helpers).  Gluon kernels do not run under TRITON_INTERPRET, so there is no CPU mode.
"""
import argparse
import csv
import os
import sys

import numpy as np
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
def stream_kernel(w_desc, out_ptr, N, blocks_per_split, nblocks, STAGES: gl.constexpr, num_warps: gl.constexpr):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKB: gl.constexpr = w_desc.block_type.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 1, 8], [32 // BKB, BKB, 1], [num_warps, 1, 1], [2, 1, 0])
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
    acc, = gl.warp_specialize([(_fold_partition, (r0, r1, r2, ready, empty, nk, BN, BKB, layout)),
                               (_load_partition, (w_desc, r0, r1, r2, ready, empty, n0, b0, nk, BKB))], [1], [24])
    row = gl.xor_sum(gl.xor_sum(acc, axis=2), axis=1)
    offs = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    gl.atomic_xor(out_ptr + offs, row, mask=offs < N)


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
    sms = torch.cuda.get_device_properties(words.device).multi_processor_count
    per_sm = max(1, SMEM // (3 * stages * bn * bkb * 32))  # programs whose rings fit an SM's shared memory at once
    split = max(1, min(nblocks // bkb, per_sm * sms // triton.cdiv(n, bn)))
    per = triton.cdiv(triton.cdiv(nblocks, split), bkb) * bkb
    stream_kernel[(triton.cdiv(n, bn), triton.cdiv(nblocks, per))](
        desc or descriptor(words, config), out, n, per, nblocks, STAGES=stages, num_warps=warps, maxnreg=128)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for ws_probe.csv")
    args = ap.parse_args()
    from quantease.kernels import gemv_half2

    rows = []
    fp16 = {}
    for n, k in SHAPES:
        p = kb.make_prepared(n, k, 3, -1, 0.0, asym=True)
        words = p["words"].view(torch.int32).view(n, -1)
        want = np.bitwise_xor.reduce(words.cpu().numpy(), axis=1)
        out = torch.empty(n, dtype=torch.int32, device="cuda")
        base = kb.time_fp16(n, k, 1, fp16)
        gemv = kb.time_kernel(p, 1, lambda x, q, o: gemv_half2.qgemv_half2(x, gemv_half2.cached_layout(q), None, o))
        mb = words.numel() * 4 / 1e6
        print(f"{n}x{k}: {mb:.1f} MB of words; fp16 {base:.1f} us, GEMV {gemv:.1f} us ({mb / gemv:.2f} TB/s)",
              flush=True)
        rows.append([n, k, "gemv_half2", "", f"{gemv:.2f}", f"{mb / gemv:.3f}", f"{base:.2f}"])
        for cfg in CONFIGS:
            if n % cfg[0] or (k // 256) % cfg[1]:
                continue
            ok = bool((stream(words, cfg, out.zero_()).cpu().numpy() == want).all())
            copies = [words] + [words.clone() for _ in range(kb.n_copies(words.numel() * 4) - 1)]
            descs = [descriptor(w, cfg) for w in copies]
            us = kb.graph_time([lambda w=w, d=d: stream(w, cfg, out, d) for w, d in zip(copies, descs)])
            del copies, descs
            print(f"  {cfg}: {'ok' if ok else 'WRONG xor'} {us:.1f} us ({mb / us:.2f} TB/s)", flush=True)
            rows.append([n, k, "stream", str(cfg), f"{us:.2f}", f"{mb / us:.3f}", f"{base:.2f}", ok])
        del p, words
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ws_probe.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["n", "k", "kernel", "config", "us", "words_tb_s", "fp16_us", "xor_ok"])
            w.writerows(rows)


if __name__ == "__main__":
    main()
