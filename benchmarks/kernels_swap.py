"""GPU benchmark of the v5 swap-AB GEMM (quantease/kernels/gemm_swap.py), one device command:

    export PYTHONPATH=$PWD; python3 benchmarks/kernels_swap.py --out $OUT
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/kernels_swap.py --tiny   # CPU dry run, timers stubbed

1. correctness: the 6 shapes x M in {4, 16, 64, 256}, fp16 (and bf16 at 16 / 256), 3-bit per channel + 0.5%
   outliers, the table's config, vs the float64 reference: max relative error per shape.
2. timing (L2 cold, CUDA graphs, medians; helpers of benchmarks/kernels.py): fp16 F.linear, the default dispatch
   (ops._forward, backend "triton"), and gemm_swap over the candidate configs of each M bucket, 0% outliers;
   at 0.5% the best 0% config with the outliers fused in the epilogue and as the separate ELL launch (BM > 64:
   both read "separate": the wrapper does not fuse there, see gemm_swap.FUSED_MAX_BM).
Prints one row per (shape, M) as it goes, writes $OUT/swap.csv and $OUT/swap.log, then the best config per M bucket
(summed over the shapes) and the issue-5 targets.  Candidate configs are skipped once --budget seconds are used.
--asym: every weight gets random uint8 zeros [N, 1] (quantease's default checkpoint: per-channel asymmetric); the
REGA candidates then run the asymmetric register-A path (epilogue (z - 4) * sum_k x), and --quick adds a column
with the table config on the same shapes' symmetric weights.
"""
import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402  (benchmarks/kernels.py: make_prepared, time_fp16, time_kernel, run_default)

SHAPES = kb.SHAPES
ASYM = False  # --asym
TAG = ""  # "_asym": output file names
MS = (4, 8, 16, 32, 64, 128, 256)
# (BM, BN, num_warps, num_stages, SPLIT_K (0 auto), REGA) candidates per M bucket; the table's entry first
CANDIDATES = {
    16: [(16, 128, 4, 1, 0, True), (16, 64, 4, 1, 0, True), (16, 128, 8, 1, 0, True), (16, 64, 4, 1, 1, True),
         (16, 64, 4, 3, 0, False)],
    32: [(32, 64, 4, 3, 0, False), (32, 64, 4, 1, 0, True), (32, 128, 8, 1, 0, True)],
    64: [(64, 128, 8, 3, 0, False), (64, 64, 4, 1, 0, True), (64, 128, 8, 1, 0, True), (64, 64, 4, 3, 0, False)],
    128: [(128, 128, 8, 2, 0, False), (128, 64, 4, 2, 0, False), (128, 64, 4, 1, 0, True)],
    256: [(256, 128, 8, 1, 0, False), (128, 128, 8, 2, 0, False), (128, 64, 4, 2, 0, False),
          (256, 64, 4, 1, 0, False)],
}


def make_prepared(n, k, fraction, device, seed=0, asym=None):
    """kb.make_prepared (3-bit per channel), with random zeros in [0, 8) per row when asym (default: --asym)."""
    return kb.make_prepared(n, k, 3, -1, fraction, device=device, seed=seed, asym=ASYM if asym is None else asym)


class Tee:
    def __init__(self, path):
        self.f = open(path, "w")

    def write(self, s):
        sys.__stdout__.write(s)
        self.f.write(s)

    def flush(self):
        sys.__stdout__.flush()
        self.f.flush()


def bucket(m):
    from quantease.kernels import gemm_swap

    return min(b for b in gemm_swap.CONFIGS if m <= b) if m <= max(gemm_swap.CONFIGS) else max(gemm_swap.CONFIGS)


def swap_run(cfg, fused=None):
    from quantease.kernels import gemm_swap

    return lambda x, q, o: gemm_swap.qgemm_swap(x, q, None, o, cfg, outliers_fused=fused)


def check(device, shapes, ms):
    from quantease.kernels import dequantize_prepared, gemm_swap

    print("check: relative error vs float64 (tolerance fp16 3e-3, bf16 1.5e-2), table config, 0.5% outliers fused")
    worst = 0.0
    for n, k in shapes:
        p, _ = make_prepared(n, k, 0.005, device, seed=1)
        w64 = dequantize_prepared(p).double()
        errs = []
        for m, dtype in [(m, torch.float16) for m in ms] + [(ms[1], torch.bfloat16), (ms[-1], torch.bfloat16)]:
            x = torch.randn(m, k, device=device).to(dtype)
            out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
            y = gemm_swap.qgemm_swap(x, p, None, out)
            ref = x.double() @ w64.t()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            ok = bool(torch.isfinite(y).all()) and err < (3e-3 if dtype == torch.float16 else 1.5e-2)
            errs.append(f"M={m} {str(dtype)[6:]} {err:.1e}{'' if ok else ' FAIL'}")
            if dtype == torch.float16:
                worst = max(worst, err)
        print(f"  {n}x{k}: " + ", ".join(errs), flush=True)
        del w64, p
    print(f"check: max relative error (fp16) {worst:.2e}", flush=True)


# --quick: v5.1 candidates (7th element XPF: x slot tiles loaded XPF slots ahead) on 3 shapes x M in {4, 16, 64}
QUICK_SHAPES = ((4096, 4096), (8192, 8192), (28672, 8192))
QUICK_MS = (4, 16, 64)
QUICK = {
    16: [(16, 128, 4, 1, 0, True, 0), (16, 128, 4, 1, 0, True, 2), (16, 128, 4, 1, 0, True, 4),
         (16, 64, 4, 1, 8, True, 0), (16, 64, 4, 1, 8, True, 4), (16, 64, 4, 3, 0, False, 0)],
    64: [(64, 128, 8, 3, 0, False, 0), (64, 128, 8, 1, 0, True, 0), (64, 128, 8, 1, 0, True, 2),
         (64, 128, 8, 1, 0, True, 4), (64, 64, 4, 1, 0, True, 4)],
}
# --pipe (session 4): the REGA K loop software-pipelined (8th element PIPE; XPF 0), beside the table's configs.
# sm_90 AOT (triton 3.6, asym): (16, 64, 4) pipe 2 95 regs / 21 KB smem, pipe 3 95 / 37 KB; (16, 128, 4) pipe 2 157 /
# 33 KB; (32, 64, 4) pipe 2 103 / 30 KB; (64, 128, 8) pipe 2 123 / 61 KB -- every HGMMA keeps register A.
PIPE_QUICK = {
    16: [(16, 64, 4, 1, 8, True, 4), (16, 64, 4, 1, 8, True, 0, 2), (16, 64, 4, 1, 8, True, 0, 3),
         (16, 64, 4, 1, 0, True, 0, 2), (16, 128, 4, 1, 0, True, 0, 2), (16, 64, 4, 1, 16, True, 0, 2)],
    64: [(64, 128, 8, 1, 0, True, 2), (32, 64, 4, 3, 0, False, 0), (64, 128, 8, 1, 0, True, 0, 2),
         (32, 64, 4, 1, 0, True, 0, 2), (32, 64, 4, 1, 0, True, 2), (64, 64, 4, 1, 0, True, 0, 2)],
}

# --mma2 (session 4; run in session 5: results/kernels_swap.md): 1-warp programs on the 16-bit path.  A dot in a
# 1-warp program cannot be a wgmma (warp groups of 4), so triton emits mma.sync (HMMA.16816) with BOTH operands in
# registers: sm_90 AOT (triton 3.6, asym, fp16): (16, 16, 1, stages 1) 100 registers, no spills, no STS / BAR in the
# loop (x^T fragments loaded straight from global), 816 instructions per 4096-weight block iteration; (16, 16, 1) +
# fused outliers 96; (16, 32, 1) 175; (64, 16, 1) 168; (16, 16, 1, stages 3) 123 with cp.async x / words.
MMA2_QUICK = {  # SPLIT_K 0: auto, to gemm_swap.SPLIT_TARGET_ONE_WARP programs for 1-warp configs
    16: [(16, 64, 4, 1, 8, True, 4), (16, 16, 1, 1, 0, False), (16, 16, 1, 1, 4, False), (16, 16, 1, 3, 0, False),
         (16, 32, 1, 1, 0, False), (16, 16, 1, 1, 2, False), (16, 16, 1, 1, 4, True, 0)],
    64: [(64, 128, 8, 1, 0, True, 2), (32, 64, 4, 1, 0, True, 2), (32, 16, 1, 1, 0, False), (64, 16, 1, 1, 0, False),
         (64, 16, 1, 1, 2, False), (32, 16, 1, 1, 8, False)],
}
# --wpf (session 5): round 2 around the winner of round 1, (16, 32, 1, 1, auto) 28.5-29.9 us at 8192^2 M = 2-16
# (results/kernels_swap.md, H200 session 5): words loaded a block ahead (9th element WPF), x prefetch, explicit
# splits, 2 warps
WPF_QUICK = {
    16: [(16, 32, 1, 1, 0, False), (16, 32, 1, 1, 0, False, 0, None, 1), (16, 16, 1, 1, 0, False, 0, None, 1),
         (16, 32, 1, 1, 4, False), (16, 32, 1, 1, 0, False, 2), (16, 32, 1, 1, 0, False, 2, None, 1),
         (16, 32, 2, 1, 0, False), (16, 64, 2, 1, 0, False, 0, None, 1)],
    64: [(32, 64, 4, 1, 0, True, 2), (32, 32, 1, 1, 0, False, 0, None, 1), (32, 16, 1, 1, 0, False, 0, None, 1),
         (32, 32, 2, 1, 0, False, 0, None, 1)],
}


def quick(args, time_kernel, time_fp16, rotate, device, shapes, ms, cands=QUICK):
    """Correctness of every candidate (fp16 + bf16, 0.5% outliers, NaN-poisoned out) on the first two shapes,
    then times: fp16 F.linear, the fused v3 GEMM (gemm.qgemm), the table's swap config, each candidate (0%
    outliers), and on the first shape (4096x4096) at 0.5% the best candidate and the table config with the
    outliers fused (x^T copy / gathered from x) and as the separate launch."""
    from quantease.kernels import dequantize_prepared, gemm, gemm_swap

    t0 = time.time()
    quick_b = lambda m: 16 if m <= 16 else 64  # noqa: E731
    print("check: every candidate, relative error vs float64 (tolerance fp16 3e-3, bf16 1.5e-2), 0.5% outliers")
    bad = 0
    for n, k in shapes[:2]:
        p, _ = make_prepared(n, k, 0.005, device, seed=2)
        w64 = dequantize_prepared(p).double()
        errs = []
        for m in ms:
            for cfg in cands[quick_b(m)] + [cands[quick_b(m)][0] + ("gx",)]:  # last: fused gather from x
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(m, k, device=device).to(dtype)
                    out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
                    y = gemm_swap.qgemm_swap(x, p, None, out, cfg if cfg[-1] != "gx" else cfg[:-1],
                                             gather_x=cfg[-1] == "gx")
                    ref = x.double() @ w64.t()
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    ok = bool(torch.isfinite(y).all()) and err < (3e-3 if dtype == torch.float16 else 1.5e-2)
                    bad += not ok
                    if not ok or dtype == torch.float16:
                        errs.append(f"M={m} {cfg[1:]} {str(dtype)[6:]} {err:.1e}{'' if ok else ' FAIL'}")
        print(f"  {n}x{k}: " + ", ".join(errs), flush=True)
        del w64, p
    print(f"check: {'all pass' if not bad else f'{bad} FAILED'} [{time.time() - t0:.0f}s]", flush=True)
    f = open(os.path.join(args.out, f"swap_quick{TAG}.csv"), "w", newline="")
    writer = csv.writer(f)
    writer.writerow(["n", "k", "m", "fraction", "variant", "config", "us", "fp16_us", "speedup_vs_fp16"])
    fp16 = {}
    print(f"\nweights: {'asymmetric (random zeros)' if ASYM else 'symmetric'}")
    print("\n| N x K | M | fp16 us | v3 gemm us | swap table us | " + ("table sym us | " if ASYM else "") + " | ".join(
        "cand " + str(i) for i in range(max(len(c) for c in cands.values()))) + " |", flush=True)
    for n, k in shapes:
        if time.time() - t0 > args.deadline:
            print(f"  deadline ({args.deadline:.0f}s): {n}x{k} and later shapes skipped", flush=True)
            break
        p0 = rotate(make_prepared(n, k, 0.0, device)[0])
        p0s = rotate(make_prepared(n, k, 0.0, device, asym=False)[0]) if ASYM else None
        p5 = rotate(make_prepared(n, k, 0.005, device)[0]) if (n, k) == shapes[0] else None
        for m in ms:
            base = time_fp16(n, k, m, fp16)
            v3 = time_kernel(p0, m, lambda x, q, o: gemm.qgemm(x, q, None, o))
            tab = time_kernel(p0, m, swap_run(None))
            cells, res = [], []
            named = (("fp16", base, ""), ("v3_gemm", v3, ""), ("swap_table", tab, gemm_swap.pick_config(m)))
            if ASYM:  # the same shape's symmetric weights, table config: what the asymmetric epilogue costs
                tab_sym = time_kernel(p0s, m, swap_run(None))
                named += (("swap_table_sym", tab_sym, gemm_swap.pick_config(m)),)
                cells.append(f"{tab_sym:.1f}")
            for name, us, cfg in named:
                writer.writerow([n, k, m, 0.0, name, str(cfg), f"{us:.2f}", f"{base:.2f}", f"{base / us:.3f}"])
            for cfg in cands[quick_b(m)]:
                us = time_kernel(p0, m, swap_run(cfg))
                res.append((us, cfg))
                cells.append(f"{us:.1f}")
                writer.writerow([n, k, m, 0.0, "swap", str(cfg), f"{us:.2f}", f"{base:.2f}", f"{base / us:.3f}"])
            print(f"| {n}x{k} | {m} | {base:.1f} | {v3:.1f} | {tab:.1f} | " + " | ".join(cells) + " |", flush=True)
            us0, cfg0 = min(res)
            print(f"    best {cfg0}: {us0:.1f} us = {base / us0:.2f}x fp16", flush=True)
            if p5 is not None:
                line = []
                variants = [(cfg0, True, False), (cfg0, True, True), (cfg0, False, False),
                            (gemm_swap.pick_config(m), True, False), (gemm_swap.pick_config(m), False, False)]
                for cfg, fused, gx in variants:
                    if (fused or gx) and cfg[0] > gemm_swap.FUSED_MAX_BM:
                        continue  # the wrapper would run the separate launch: same as the fused=False row
                    us = time_kernel(p5, m, lambda x, q, o, c=cfg, f=fused, g=gx: gemm_swap.qgemm_swap(
                        x, q, None, o, c, outliers_fused=f, gather_x=g))
                    name = ("swap_fused_gather_x" if gx else "swap_fused") if fused else "swap_separate"
                    writer.writerow([n, k, m, 0.005, name, str(cfg), f"{us:.2f}", f"{base:.2f}", f"{base / us:.3f}"])
                    line.append(f"{cfg} {name[5:]} {us:.1f} ({us / us0 - 1:+.0%})")
                print("    0.5% outliers (vs best 0%): " + "; ".join(line), flush=True)
            f.flush()
        del p0, p5, p0s
    print("candidates: " + "; ".join(f"{b}: " + ", ".join(f"{i}={c}" for i, c in enumerate(cands[b])) for b in cands))
    print(f"[{time.time() - t0:.0f}s] wrote {args.out}/swap_quick{TAG}.csv and swap_quick{TAG}.log", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="v5.1 candidates only (QUICK), ~3 min on an H100")
    ap.add_argument("--pipe", action="store_true", help="with --quick: session 4's pipelined candidates (PIPE_QUICK)")
    ap.add_argument("--mma2", action="store_true", help="with --quick: 1-warp mma.sync candidates (MMA2_QUICK)")
    ap.add_argument("--wpf", action="store_true", help="with --quick: round 2 of them, words prefetched (WPF_QUICK)")
    ap.add_argument("--ms", default=None, help="with --quick: M values (default 4,16,64)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=330.0, help="seconds after which only the table config is timed")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds after which no new shape is started")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run under TRITON_INTERPRET=1, timers stubbed")
    ap.add_argument("--asym", action="store_true", help="asymmetric weights (random per-channel zeros)")
    args = ap.parse_args()
    global ASYM, TAG
    ASYM = args.asym
    TAG = "".join(t for t, on in (("_asym", args.asym), ("_pipe", args.pipe), ("_mma2", args.mma2),
                                  ("_wpf", args.wpf)) if on)
    os.makedirs(args.out, exist_ok=True)
    sys.stdout = Tee(os.path.join(args.out, ("swap_quick" if args.quick else "swap") + TAG + ".log"))
    from quantease.kernels import gemm_swap

    t0 = time.time()
    device, shapes, ms = "cuda", SHAPES, MS
    rotate, time_kernel, time_fp16 = kb.rotated_timers(args.tiny)  # weight copies made once, not per call
    if args.tiny:  # run every code path once on CPU, no timing
        device, shapes, ms = "cpu", ((40, 600), (72, 300)), (4, 16, 64, 256)
        print("tiny: CPU interpreter, timers stubbed (every time reads 1.0)")
    else:
        print(torch.cuda.get_device_name(), torch.__version__, __import__("triton").__version__, flush=True)
    if args.quick:
        qs, qm = QUICK_SHAPES, QUICK_MS
        cands = PIPE_QUICK if args.pipe else (MMA2_QUICK if args.mma2 else (WPF_QUICK if args.wpf else QUICK))
        if args.ms:
            qm = tuple(int(v) for v in args.ms.split(","))
        if args.tiny:
            qs, qm = ((72, 300), (40, 600)), QUICK_MS
        return quick(args, time_kernel, time_fp16, rotate, device, qs, qm, cands)
    check(device, shapes, (4, 16, 64, 256))
    print(f"[{time.time() - t0:.0f}s]", flush=True)

    f = open(os.path.join(args.out, f"swap{TAG}.csv"), "w", newline="")
    writer = csv.writer(f)
    writer.writerow(["n", "k", "m", "fraction", "variant", "config", "us", "fp16_us", "speedup_vs_fp16"])
    fp16, best0, totals, rows = {}, {}, {}, []
    print("\n| N x K | M | fp16 us | default us | swap us (best config) | swap 0.5% fused / separate us | "
          "outlier cost | speedup vs fp16: default / swap / swap 0.5% |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for n, k in shapes:
        if time.time() - t0 > args.deadline:
            print(f"  deadline ({args.deadline:.0f}s): {n}x{k} and later shapes skipped", flush=True)
            break
        p0 = rotate(make_prepared(n, k, 0.0, device)[0])
        p5 = rotate(make_prepared(n, k, 0.005, device)[0])
        for m in ms:
            base = time_fp16(n, k, m, fp16)
            dflt = time_kernel(p0, m, kb.run_default)
            writer.writerow([n, k, m, 0.0, "fp16", "", f"{base:.2f}", f"{base:.2f}", "1.000"])
            writer.writerow([n, k, m, 0.0, "default", "", f"{dflt:.2f}", f"{base:.2f}", f"{base / dflt:.3f}"])
            cands = CANDIDATES[bucket(m)]
            if time.time() - t0 > args.budget:
                cands = [gemm_swap.pick_config(m)]
            res = []
            for cfg in cands:
                try:
                    us = time_kernel(p0, m, swap_run(cfg))
                except Exception as e:  # a config the compiler rejects (registers, shared memory)
                    print(f"  swap {cfg} failed: {str(e).splitlines()[0][:100]}", flush=True)
                    continue
                res.append((us, cfg))
                totals.setdefault((bucket(m), cfg), {})[(n, k, m)] = us
                writer.writerow([n, k, m, 0.0, "swap", str(cfg), f"{us:.2f}", f"{base:.2f}", f"{base / us:.3f}"])
            us0, cfg0 = min(res)
            best0[(n, k, m)] = (us0, cfg0)
            d5 = time_kernel(p5, m, kb.run_default)
            fu = time_kernel(p5, m, swap_run(cfg0, True))
            se = time_kernel(p5, m, swap_run(cfg0, False))
            for name, us in (("default", d5), ("swap_fused", fu), ("swap_separate", se)):
                writer.writerow([n, k, m, 0.005, name, str(cfg0) if name != "default" else "", f"{us:.2f}",
                                 f"{base:.2f}", f"{base / us:.3f}"])
            f.flush()
            us5 = min(fu, se)
            rows.append((n, k, m, base, dflt, us0, us5, d5))
            print(f"| {n}x{k} | {m} | {base:.1f} | {dflt:.1f} | {us0:.1f} {cfg0} | {fu:.1f} / {se:.1f} | "
                  f"{(us5 / us0 - 1) * 100:+.0f}% | {base / dflt:.2f} / {base / us0:.2f} / {base / us5:.2f} |",
                  flush=True)
        del p0, p5
    print(f"[{time.time() - t0:.0f}s]")

    print("\nbest config per M bucket (sum of times over the shapes and Ms of the bucket that timed it everywhere):")
    for b in sorted(CANDIDATES):
        full = [(sum(t.values()), cfg) for (bb, cfg), t in totals.items()
                if bb == b and len(t) == max(len(t2) for (b2, _), t2 in totals.items() if b2 == b)]
        if full:
            tot, cfg = min(full)
            print(f"  {b}: {cfg}  (sum {tot:.1f} us; table has {gemm_swap.CONFIGS[b]})")
    print("\ntargets (issue 5, best swap config per row):")
    for m in ms:
        r = [x for x in rows if x[2] == m]
        sp = ", ".join(f"{n}x{k} {base / us0:.2f}x" for n, k, _, base, _, us0, _, _ in r)
        print(f"  M={m}: swap speedup vs fp16: {sp}")
    r16 = [base / us0 for _, _, m, base, _, us0, _, _ in rows if m == 16]
    r256 = [us0 / base for _, _, m, base, _, us0, _, _ in rows if m == 256]
    oc = [us5 / us0 - 1 for *_, us0, us5, _ in rows]
    if r16:
        print(f"  M=16 >= 3x fp16: min {min(r16):.2f}x over the shapes -> {'met' if min(r16) >= 3 else 'NOT met'}")
    if r256:
        print(f"  M=256 time <= 1.25x fp16: max {max(r256):.2f}x -> {'met' if max(r256) <= 1.25 else 'NOT met'}")
    if oc:
        print(f"  0.5% outliers <= +10%: max {max(oc) * 100:+.0f}% -> {'met' if max(oc) <= 0.10 else 'NOT met'}")
    print(f"[{time.time() - t0:.0f}s] wrote {args.out}/swap{TAG}.csv and swap{TAG}.log", flush=True)


if __name__ == "__main__":
    main()
