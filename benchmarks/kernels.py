"""GPU benchmark of the fused 3-bit linear (quantease.kernels) against fp16 F.linear (cuBLAS), same run.

    PYTHONPATH=$PWD python3 benchmarks/kernels.py --check --sweep --bench --out $OUT
    PYTHONPATH=$PWD python3 benchmarks/kernels.py --variant half2 --out $OUT   # GEMV v1 vs v2, M <= 4
    python benchmarks/kernels.py --plot benchmarks/results/kernels.csv --note "H100, 2026-12-07"   # matplotlib

Timing: every variant is captured in a CUDA graph that calls it once per weight copy, the copies rotating over
>= 512 MB so that L2 (50 MB) is cold; median over graph replays, divided by the copies per replay.
GB/s counts the bytes a call must move: the code layout it reads (half2 words for the GEMV, bit planes above) +
scales/zeros + outlier slots + x + y (before 2026-12-02 11:30 UTC it counted both code layouts: results/kernels.csv's
gbs column, run earlier that day, is ~2x too high on the weight part).
--pdl-ab [MODE] times every --bench row twice, with programmatic dependent launch (kernels/pdl.py) in MODE (1: the next
call launches from the kernel's top, late: from after its K loop; default 1) and off: on, consecutive calls in the
graph overlap (a call's first weight loads start while the one before finishes).
"""
import argparse
import itertools
import csv
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672))
MS = (1, 4, 16, 64, 256)
FRACTIONS = (0.0, 0.005, 0.01)
ROTATE_BYTES = 512 << 20


def make_prepared(n, k, bits, group_size, fraction, device="cuda", seed=0, asym=False, planes=None):
    """Random checkpoint tensors (every bit pattern is a valid code; asym: random zeros, else symmetric) ->
    prepared dict + checkpoint tuple (planes: prepare_weights' option; None = the default, which on CUDA drops
    the bit planes where the Q = 8 half2 words cover every path)."""
    from quantease.format import layout
    from quantease.kernels import prepare_weights

    g = torch.Generator(device=device).manual_seed(seed)
    words = layout.padded_k(k) // 32 * bits
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, words), generator=g, device=device, dtype=torch.int32)
    ng = layout.num_groups(k, group_size)
    scales = (torch.rand(n, ng, generator=g, device=device) * 0.02 + 0.005).half()
    r = layout.outlier_slots(k, fraction)
    idx = val = None
    if r:
        idx = torch.sort(torch.randint(0, k, (n, r), generator=g, device=device), 1).values
        idx = idx.to(layout.index_dtype(k))
        val = torch.randn(n, r, generator=g, device=device).half()
    zeros = None
    if asym:  # own stream: the symmetric draws above stay the same with or without zeros
        gz = torch.Generator(device=device).manual_seed(seed + 1000)
        zeros = torch.randint(0, 2 ** bits, (n, ng), generator=gz, device=device, dtype=torch.uint8)
    ckpt = (qweight, scales, zeros, idx, val)
    return prepare_weights(*ckpt, bits, group_size, k, planes=planes), ckpt


def weight_bytes(p):
    """Every tensor of the prepared dict (both code layouts when the half2 words are there): what a copy holds."""
    return sum(t.numel() * t.element_size() for name, t in p.items()
               if isinstance(t, torch.Tensor))


def call_bytes(p, m):
    """What one call of the default dispatch reads of the weight: the half2 words up to gemm_half2.MAX_M rows
    and at every M where the planes were dropped, else the bit planes -- never both -- plus scales, zeros and
    outlier slots."""
    from quantease.kernels import gemm_half2, ops

    words = p.get("words") is not None and (p.get("plane0") is None or m <= max(ops.GEMV_MAX_M, gemm_half2.MAX_M))
    codes = ("words",) if words else ("plane0", "plane1")
    names = codes + ("scales", "zeros", "outlier_idx", "outlier_val")
    return sum(p[t].numel() * p[t].element_size() for t in names if p.get(t) is not None)


def copies(p, count):
    out = [p]
    for _ in range(count - 1):
        out.append({kk: (v.clone() if isinstance(v, torch.Tensor) else v) for kk, v in p.items()})
    return out


def graph_time(calls, replays=20):
    """Median microseconds per call: all calls captured once in a CUDA graph, the graph replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm-up: compile, autotune-free first launches
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return replay_median(graph, replays) / len(calls)


def replay_median(graph, replays):
    """Median microseconds of one replay of a captured CUDA graph (one untimed replay first)."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def n_copies(nbytes):
    return max(2, min(128, math.ceil(ROTATE_BYTES / nbytes)))


def time_fp16(n, k, m, cache):
    key = (n, k, m)
    if key not in cache:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        ws = [w] + [w.clone() for _ in range(n_copies(w.numel() * 2) - 1)]
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        cache[key] = graph_time([lambda w=w: F.linear(x, w) for w in ws])
        del ws, w
    return cache[key]


def time_kernel(p, m, run, dtype=torch.float16):
    ps = copies(p, n_copies(weight_bytes(p)))
    x = torch.randn(m, p["in_features"], device="cuda", dtype=dtype)
    out = torch.empty(m, p["out_features"], device="cuda", dtype=dtype)
    us = graph_time([lambda q=q: run(x, q, out) for q in ps])
    del ps
    return us


def rotated_timers(tiny=False):
    """(rotate, time_kernel, time_fp16) for scripts that time many configs on one weight: rotate(p) makes the L2-cold
    weight copies once, time_kernel(copies, m, run) times run(x, copy, out) over them (CUDA graph, fp16 x), and
    time_fp16 is time_fp16 above.  tiny: the CPU dry run -- one copy, each run called once, every time 1.0."""
    if tiny:
        def time_once(ps, m, run):
            x = torch.randn(m, ps[0]["in_features"], dtype=torch.float16)
            run(x, ps[0], torch.empty(m, ps[0]["out_features"], dtype=torch.float16))
            return 1.0
        return (lambda p: [p]), time_once, (lambda n, k, m, cache: 1.0)

    def time_rotated(ps, m, run):
        x = torch.randn(m, ps[0]["in_features"], device="cuda", dtype=torch.float16)
        out = torch.empty(m, ps[0]["out_features"], device="cuda", dtype=torch.float16)
        return graph_time([lambda q=q: run(x, q, out) for q in ps])
    return (lambda p: copies(p, n_copies(weight_bytes(p)))), time_rotated, time_fp16


def time_pdl(p, m, flag):
    """time_kernel(p, m, run_default) with programmatic dependent launch (kernels/pdl.py) on ("1") or off ("0").
    Off, each call starts only after the one before has finished: the kernel's time on its own.  On, a call's
    first weight loads overlap the one before's tail (consecutive calls in the graph, as consecutive layers)."""
    from quantease.kernels import pdl

    old = os.environ.get(pdl.ENV)
    os.environ[pdl.ENV] = flag
    try:
        return time_kernel(p, m, run_default)
    finally:
        if old is None:
            del os.environ[pdl.ENV]
        else:
            os.environ[pdl.ENV] = old


def run_default(x, p, out):
    from quantease.kernels import ops

    return ops._forward(x, p, None, "triton", out)


def check(args):
    """GPU results vs the float64 reference on the benchmark shapes (one weight each)."""
    from quantease.kernels import dequantize_prepared

    print("check: relative error vs float64 reference (tolerance fp16 3e-3, bf16 1.5e-2)")
    worst = 0.0
    for n, k in SHAPES:
        for fraction, group_size in ((0.01, -1), (0.005, 128)):
            p, _ = make_prepared(n, k, 3, group_size, fraction, seed=1)
            w64 = dequantize_prepared(p).double()
            for m in (1, 3, 16, 64, 256):
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    y = run_default(x, p, out)
                    ref = x.double() @ w64.t()
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    ok = torch.isfinite(y).all().item() and err < (3e-3 if dtype == torch.float16 else 1.5e-2)
                    worst = max(worst, err)
                    if not ok:
                        print(f"  FAIL {n}x{k} g={group_size} frac={fraction} M={m} {dtype}: err={err:.2e}")
            del w64, p
    print(f"check: worst relative error {worst:.2e}")


# candidates kept from earlier sweeps (benchmarks/kernel_notes.md has the full ones)
GEMV_CFGS = [(8, 4, 1, 3), (32, 4, 4, 3), (8, 2, 1, 3), (8, 4, 2, 3), (16, 4, 2, 3), (64, 4, 8, 3)]
GEMM_CFGS = {16: [(16, 128, 4, 3, 8), (16, 64, 4, 3, 8), (16, 128, 8, 3, 8)],
             64: [(32, 128, 4, 3, 8), (64, 128, 4, 3, 8), (64, 64, 4, 3, 8)],
             256: [(128, 128, 8, 2, 8), (128, 256, 8, 2, 8)]}


def sweep(args, writer):
    """Time candidate configs of each path on two shapes; the best (summed over the shapes) per M goes into the
    kernels' CONFIGS tables for the rest of this run, and is printed for copying into the source."""
    from quantease.kernels import gemm, gemv, ops

    fp16, total = {}, {}
    for n, k in ((8192, 8192), (28672, 8192)):
        p, _ = make_prepared(n, k, 3, -1, 0.0)
        for m in (1, 2, 4, 16, 64):
            base = time_fp16(n, k, m, fp16)
            variants = [("gemv", cfg, {}) for cfg in GEMV_CFGS] if m <= 4 else []
            if m == 1:  # what the in-place unpack, the LOP3 asm and the register prefetch buy
                variants += [("gemv", GEMV_CFGS[0], dict(inplace=False)), ("gemv", GEMV_CFGS[0], dict(asm=False)),
                             ("gemv", GEMV_CFGS[0], dict(prefetch=False))]
            if m >= 4:
                variants += [("gemm", cfg, {}) for cfg in GEMM_CFGS[min(256, max(16, m))]]
            if m == 16:
                variants += [("gemm", GEMM_CFGS[16][1], dict(inplace=False))]
            res = []
            for path, cfg, kw in variants:
                fn = gemv.qgemv if path == "gemv" else gemm.qgemm
                try:
                    us = time_kernel(p, m, lambda x, q, o: fn(x, q, None, o, cfg, **kw))
                except Exception as e:  # a config the compiler rejects (registers, shared memory)
                    print(f"  {path} {cfg} failed: {str(e).splitlines()[0][:80]}")
                    continue
                name = f"{path}{cfg} {kw or ''}"
                res.append((us, name))
                if not kw:
                    total.setdefault((m, path, cfg), []).append(us)
                writer.writerow(["sweep", n, k, m, 0.0, name, f"{us:.2f}", "", f"{base / us:.3f}"])
            res.sort()
            for us, name in res[:3]:
                print(f"sweep {n}x{k} M={m}: {us:7.1f} us  {base / us:4.2f}x fp16  {name}")
            print(f"  (fp16 {base:.1f} us; {len(res)} variants)", flush=True)
        del p
    best = {}
    for (m, path, cfg), ts in total.items():
        if len(ts) == 2 and (m not in best or sum(ts) < best[m][0]):
            best[m] = (sum(ts), path, cfg)
    for m in (1, 2, 4):
        if best[m][1] == "gemv":
            gemv.CONFIGS[m] = best[m][2]
    ops.GEMV_MAX_M = max(m for m in (1, 2, 4) if best[m][1] == "gemv")
    gemm.CONFIGS.update({16: best[16][2], 32: best[16][2], 64: best[64][2]})
    print(f"chosen: gemv.CONFIGS={gemv.CONFIGS} ops.GEMV_MAX_M={ops.GEMV_MAX_M}\n        gemm.CONFIGS={gemm.CONFIGS}")


def bench(args, writer):
    # "default": 3-bit per channel, symmetric (what the plots read); other grids get their own variant name
    variant = ("default" + (f"_g{args.group_size}" if args.group_size != -1 else "") + ("_asym" if args.asym else "")
               + (f"_{args.bits}bit" if args.bits != 3 else ""))
    print(f"weights: {args.bits}-bit, group size {args.group_size}, {'asymmetric' if args.asym else 'symmetric'}",
          flush=True)
    fp16 = {}
    rows = []
    for n, k in args.shapes:
        for fraction in args.fractions:
            p, _ = make_prepared(n, k, args.bits, args.group_size, fraction, asym=args.asym)
            for m in args.ms:
                base = time_fp16(n, k, m, fp16)
                us = time_pdl(p, m, args.pdl_ab) if args.pdl_ab else time_kernel(p, m, run_default)
                gbs = (call_bytes(p, m) + 2 * m * (n + k)) / us / 1e3
                off = time_pdl(p, m, "0") if args.pdl_ab else None
                rows.append((n, k, m, fraction, us, gbs, base, off))
                writer.writerow(["bench", n, k, m, fraction, variant, f"{us:.2f}", f"{gbs:.0f}", f"{base / us:.3f}",
                                 f"{base:.2f}"])
                if off is not None:  # the main row is PDL on
                    writer.writerow(["bench", n, k, m, fraction, variant + "_nopdl", f"{off:.2f}", "",
                                     f"{base / off:.3f}", f"{base:.2f}"])
                # the fused GEMM (on the planes) that the dequant + cuBLAS path replaces here
                if m == 256 and fraction == 0.0 and p.get("plane0") is not None:
                    from quantease.kernels import gemm

                    fused = time_kernel(p, m, lambda x, q, o: gemm.qgemm(x, q, None, o))
                    print(f"  {n}x{k} M=256: fused GEMM {fused:.1f} us vs dequant+cuBLAS {us:.1f} us", flush=True)
                    writer.writerow(["bench", n, k, m, fraction, "fused_gemm", f"{fused:.2f}", "",
                                     f"{base / fused:.3f}", f"{base:.2f}"])
            del p
    fr = args.fractions
    if args.pdl_ab:
        print(f"\nquantized columns: PDL on (QUANTEASE_PDL={args.pdl_ab}); 'no PDL': the same kernels with it off "
              f"(QUANTEASE_PDL=0)")
    ab = " | ".join(f"no PDL {f * 100:g}% us" for f in fr) + " | " if args.pdl_ab else ""
    print("\n| N x K | M | fp16 us | " + " | ".join(f"{args.bits}b+{f * 100:g}% us" for f in fr) + " | " + ab
          + "GB/s (first) | speedup " + " / ".join(f"{f * 100:g}%" for f in fr) + " |")
    print("|---|---|---|" + "---|" * (len(fr) * (2 if args.pdl_ab else 1)) + "---|---|")
    for n, k in args.shapes:
        for m in args.ms:
            r = {x[3]: x for x in rows if x[0] == n and x[1] == k and x[2] == m}
            base = r[fr[0]][6]
            ab = " | ".join(f"{r[f][7]:.1f}" for f in fr) + " | " if args.pdl_ab else ""
            print(f"| {n}x{k} | {m} | {base:.1f} | " + " | ".join(f"{r[f][4]:.1f}" for f in fr) + " | " + ab
                  + f"{r[fr[0]][5]:.0f} | " + " / ".join(f"{base / r[f][4]:.2f}" for f in fr) + " |")


def large_m_parts(args, writer):
    """The large-M path's parts, each timed alone (M = 256, each shape of --shapes, 0% and 0.5% outliers):
    dequantize from the planes and from the half2 words (dequant_half2; its --dq-half2 configs too), each with the
    outliers added, cuBLAS on a ready weight, the whole gemm.dequant_matmul on the planes and on the words alone."""
    from quantease.kernels import dequant_half2, gemm
    from quantease.kernels.prepare import drop_planes

    m = 256
    print(f"\nlarge-M parts, M={m}: | N x K | outliers | dequantize us (planes / words) | with outliers us (planes / "
          "words) | cuBLAS us | dequant_matmul us (planes / words) |")
    for (n, k), fraction in itertools.product(args.shapes, (0.0, 0.005)):
        p, _ = make_prepared(n, k, 3, -1, fraction, planes="keep")
        pw = drop_planes(dict(p))
        deq = time_kernel(p, m, lambda x, q, o: gemm.dequantize(q, x.dtype))
        deqw = time_kernel(pw, m, lambda x, q, o: dequant_half2.dequantize_half2(q, x.dtype, outliers=False))
        sc = "-"
        if p["outlier_idx"] is not None:
            sc = (f"{time_kernel(p, m, lambda x, q, o: gemm.dequantize(q, x.dtype, outliers=True)):.1f} / "
                  f"{time_kernel(pw, m, lambda x, q, o: dequant_half2.dequantize_half2(q, x.dtype)):.1f}")
        for blocks in args.dq_blocks:  # 256-column blocks per dequant program (gemm.DQ_BLOCKS: the default)
            out = [time_kernel(p, m, lambda x, q, o, b=blocks, f=f: gemm.dequantize(q, x.dtype, outliers=f, blocks=b))
                   for f in ((False, True) if p["outlier_idx"] is not None else (False,))]
            print(f"  {n}x{k} {fraction * 100:g}%: dequantize with {blocks} blocks per program: "
                  + " / ".join(f"{us:.1f}" for us in out) + " us (without / with the outliers)", flush=True)
            writer.writerow(["parts", n, k, m, fraction, f"dequant_blocks{blocks}"] + [f"{us:.2f}" for us in out])
        for cfg in args.dq_half2:  # dequant_half2 (BN, num_warps) candidates
            us = time_kernel(pw, m, lambda x, q, o, c=cfg: dequant_half2.dequantize_half2(q, x.dtype, config=c))
            print(f"  {n}x{k} {fraction * 100:g}%: dequant_half2 {cfg}: {us:.1f} us (outliers added)", flush=True)
            writer.writerow(["parts", n, k, m, fraction, f"dequant_half2{cfg}", f"{us:.2f}"])
        w = gemm.dequantize(p, torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ws = [w] + [w.clone() for _ in range(n_copies(w.numel() * 2) - 1)]
        mm = graph_time([lambda w=w: torch.matmul(x, w.t()) for w in ws])
        del ws, w
        full = time_kernel(p, m, lambda x, q, o: gemm.dequant_matmul(x, q, None, o))
        fullw = time_kernel(pw, m, lambda x, q, o: gemm.dequant_matmul(x, q, None, o))
        print(f"| {n}x{k} | {fraction * 100:g}% | {deq:.1f} / {deqw:.1f} | {sc} | {mm:.1f} | {full:.1f} / "
              f"{fullw:.1f} |", flush=True)
        writer.writerow(["parts", n, k, m, fraction, "dequant/dequant_words/with_outliers/cublas/full/full_words",
                         f"{deq:.2f}", f"{deqw:.2f}", sc, f"{mm:.2f}", f"{full:.2f}", f"{fullw:.2f}"])
        del p, pw


# GEMV v2 (kernels/gemv_half2.py) candidates: (BN, blocks of 128 columns per step, num_warps)
HALF2_CFGS = [(16, 16, 8), (16, 8, 4), (32, 8, 4), (8, 16, 4), (16, 32, 8), (32, 16, 8), (64, 8, 8), (8, 8, 2)]


def half2_variant(args, writer, shapes=SHAPES, device="cuda"):
    """GEMV v1 (the default dispatch) vs v2 (half2), M in {1, 2, 4}: correctness on the benchmark shapes (fp16 and
    bf16, per channel + 1% outliers and groups of 128 + 0.5%), then times: fp16 F.linear, v1, every v2 config.
    (shapes / device: for a CPU dry run of this code under TRITON_INTERPRET=1 with the timers stubbed.)"""
    from quantease.kernels import dequantize_prepared, gemv_half2
    from quantease.kernels.prepare import half2_from_prepared

    print("half2 check: relative error vs float64 reference, v1 / v2 (tolerance fp16 3e-3, bf16 1.5e-2)")
    for n, k in shapes:
        for fraction, group_size in ((0.01, -1), (0.005, 128)):
            p, _ = make_prepared(n, k, 3, group_size, fraction, device=device, seed=1)
            p2 = half2_from_prepared(p)
            w64 = dequantize_prepared(p).double()
            for m in (1, 2, 4):
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(m, k, device=device).to(dtype)
                    ref = x.double() @ w64.t()
                    errs = []
                    for run in (lambda o: run_default(x, p, o), lambda o: gemv_half2.qgemv_half2(x, p2, None, o)):
                        out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
                        y = run(out)
                        err = ((y.double() - ref).norm() / ref.norm()).item()
                        ok = torch.isfinite(y).all().item() and err < (3e-3 if dtype == torch.float16 else 1.5e-2)
                        errs.append(f"{err:.1e}{'' if ok else ' FAIL'}")
                    print(f"  {n}x{k} g={group_size} {fraction:.3f} M={m} {str(dtype)[6:]}: {' / '.join(errs)}")
            del w64, p, p2
    fp16 = {}
    print("\n| N x K | M | outl. | fp16 us | default us (v1 GEMV M<=2, GEMM M=4) | v2 us (best cfg) | v2 asm=False us "
          "| default / v2 speedup over fp16 |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in shapes:
        for fraction in (0.0, 0.005):
            p, _ = make_prepared(n, k, 3, -1, fraction, device=device)
            p2 = half2_from_prepared(p)
            for m in (1, 2, 4):
                base = time_fp16(n, k, m, fp16)
                v1 = time_kernel(p, m, run_default)
                best = None
                for cfg in HALF2_CFGS:
                    try:
                        us = time_kernel(p2, m, lambda x, q, o: gemv_half2.qgemv_half2(x, q, None, o, cfg))
                    except Exception as e:  # a config the compiler rejects
                        print(f"  half2 {cfg} failed: {str(e).splitlines()[0][:80]}")
                        continue
                    writer.writerow(["half2", n, k, m, fraction, f"half2{cfg}", f"{us:.2f}", "", f"{base / us:.3f}",
                                     f"{base:.2f}"])
                    best = min(best or (us, cfg), (us, cfg))
                emu = ""
                if m == 1 and fraction == 0.0 and n == k == 8192:  # the same kernel without the inline PTX
                    emu = time_kernel(p2, m, lambda x, q, o: gemv_half2.qgemv_half2(x, q, None, o, best[1], asm=False))
                    emu = f"{emu:.1f}"
                writer.writerow(["half2", n, k, m, fraction, "v1", f"{v1:.2f}", "", f"{base / v1:.3f}", f"{base:.2f}"])
                print(f"| {n}x{k} | {m} | {fraction * 100:g}% | {base:.1f} | {v1:.1f} | {best[0]:.1f} {best[1]} | "
                      f"{emu} | {base / v1:.2f} / {base / best[0]:.2f} |", flush=True)
            del p, p2


def plot(path, png, note=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.reader(open(path)) if r and r[0] == "bench" and r[5] == "default"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, fraction in zip(axes, FRACTIONS):
        for n, k in SHAPES:
            pts = sorted((int(r[3]), float(r[8])) for r in rows
                         if int(r[1]) == n and int(r[2]) == k and float(r[4]) == fraction)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n}x{k}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(f"3-bit per-channel, {fraction * 100:g}% outliers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup over fp16 F.linear")
    axes[0].legend(fontsize=8)
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--parts", action="store_true", help="the large-M path's parts timed alone (each shape)")
    ap.add_argument("--dq-blocks", default="", help="--parts: also time dequantize with these blocks per program")
    ap.add_argument("--dq-half2", default="", help="--parts: also time dequant_half2 at these BNxWARPS configs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--plot", metavar="CSV")
    ap.add_argument("--note", default="", help="--plot: subtitle (machine, date)")
    ap.add_argument("--variant", choices=("half2",), help="also compare GEMV v1 with this variant (M <= 4)")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="--bench: NxK,NxK,...")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="--bench: outlier fractions")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="--bench: M values")
    ap.add_argument("--group-size", type=int, default=-1, help="--bench: scale groups (-1: per channel)")
    ap.add_argument("--asym", action="store_true", help="--bench: asymmetric weights (random zeros)")
    ap.add_argument("--bits", type=int, default=3, help="--bench: code bits (4: e.g. a --lm-head 4 shape)")
    ap.add_argument("--pdl-ab", nargs="?", const="1", choices=("1", "late"),
                    help="--bench: time every row with programmatic dependent launch on (this QUANTEASE_PDL mode, "
                         "default 1) and off")
    args = ap.parse_args()
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.ms = [int(m) for m in args.ms.split(",")]
    args.dq_blocks = [int(b) for b in args.dq_blocks.split(",") if b]
    args.dq_half2 = [tuple(int(v) for v in c.split("x")) for c in args.dq_half2.split(",") if c]
    if args.plot:
        plot(args.plot, os.path.join(os.path.dirname(__file__), "plots", "kernels_speedup.png"), args.note)
        return
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, __import__("triton").__version__, flush=True)
    t0 = time.time()
    if args.check:
        check(args)
        print(f"[{time.time() - t0:.0f}s]", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.csv"), "a", newline="") as f:
        writer = csv.writer(f)
        if args.sweep:
            sweep(args, writer)
            print(f"[{time.time() - t0:.0f}s]", flush=True)
        if args.bench:
            bench(args, writer)
            print(f"[{time.time() - t0:.0f}s]", flush=True)
        if args.parts:
            large_m_parts(args, writer)
            print(f"[{time.time() - t0:.0f}s]", flush=True)
        if args.variant == "half2":
            half2_variant(args, writer)
            print(f"[{time.time() - t0:.0f}s]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
