"""GPU benchmark of the half2-word GEMM (quantease/kernels/gemm_half2.py) and of the GEMV on the same words, one
device command:

    export PYTHONPATH=$PWD; python3 benchmarks/kernels_half2.py --out $OUT [--asym] [--deadline S]
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/kernels_half2.py --tiny      # CPU dry run, timers stubbed

1. correctness: every candidate config below (fp16 and bf16, 0.5% outliers, NaN-poisoned output) on two shapes
   against the float64 reference.
2. timing (L2 cold, CUDA graphs, medians; helpers of benchmarks/kernels.py), per shape and M in {2, 4, 8, 16, 32,
   64}: fp16 F.linear, gemm_swap's table config (the planes kernel, uint8 zeros: the dispatch before gemm_half2),
   every gemm_half2 candidate of the M bucket,
   and at 0.5% outliers the best candidate.  Writes $OUT/half2_gemm.csv and prints a table as it goes.
3. GEMV (M = 1, 2): gemv_half2's table config on words at Q = 4 (the layout it was tuned on) and at Q = 8 (the
   layout shared with gemm_half2), same weights.
--outliers: only the 0.5%-outlier epilogue variants of the table config (see outliers()).
--regs: the table config at 0% and 0.5% with ptxas register caps (config element NREG, see regs()).
--narrow: M = 4 / 16 / 32, the 1-warp table entry against 4- / 8-warp (wgmma) candidates (NARROW).
--ms M,M: --narrow / --wide / --large at these M instead (each M times its bucket's candidates).
--prologue: at 0.5% outliers, the x^T copy and the split-K zeroing as two launches or one (see prologue_ab()).
--outliers / --prologue take --outlier-ms (M values) and --outliers --variants (names; M = 1 in --outlier-ms times
the GEMV's: gemv_table, gemv_loop, gemv_loop8).
"""
import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402

SHAPES = ((4096, 4096), (8192, 8192), (28672, 8192), (8192, 28672))
MS = (2, 4, 8, 16, 32, 64)
# (BM, BN, num_warps, SPLIT_K (0 auto), PIPE) per M bucket (gemm_half2.qgemm_half2's config); the table's entry
# first.  Session 6 call 1: the plain loop (no PIPE) and an L2 prefetch of the words (removed since: slower);
# call 2: PIPE, the software-pipelined loop (cp.async of the next block's words and x tiles, one wait per block).
CANDS = {
    16: [(16, 64, 1, 0, 2), (16, 32, 1, 0, 2), (16, 64, 1, 0), (16, 16, 1, 0, 2), (16, 32, 1, 0, 3), (16, 32, 1, 16, 2)],
    32: [(32, 64, 1, 0, 2), (32, 32, 1, 0, 2), (32, 64, 1, 0), (16, 32, 1, 0, 2)],
    64: [(64, 64, 4, 0, 2), (64, 32, 1, 0, 2), (32, 32, 1, 0, 2), (64, 64, 4, 0), (64, 32, 2, 0, 2)],
}
# --wide (session 7): M = 64 / 128 on 4- and 8-warp programs (wgmma, the unpacked tile as register A), the table's
# provisional entry first, against gemm_swap's table (the planes kernel the dispatch used up to now)
# (session 7 call 1 timed the first four of each; the BN 256 ones, added after it: sm_90 AOT (64, 256, 8) 166
# registers, 701 loop instructions, 4 HGMMA per slot; (64, 256, 4) 255 + 8 B of stack).  Session 8 timed them all:
# (64, 256, 4) won M = 128 on every shape (now CONFIGS[128]); its M = 64 entry was added after that call
WIDE = {
    64: [(64, 128, 8, 0, 2), (64, 128, 4, 0, 2), (64, 64, 4, 0, 2), (64, 128, 8, 2, 2), (64, 256, 8, 0, 2),
         (64, 256, 4, 0, 2), (32, 128, 4, 0, 2)],
    128: [(128, 128, 8, 0, 2), (128, 64, 4, 0, 2), (64, 128, 8, 0, 2), (128, 128, 8, 2, 2), (64, 256, 8, 0, 2),
          (64, 256, 4, 0, 2), (64, 128, 4, 0, 2), (32, 128, 4, 0, 2)],
}
# (session 12) the last of each: the M = 16 / 32 winners' narrower x tiles -- (32, 128, 4) at M = 64 runs two
# programs per weight tile (each decodes it; the second reads the words from L2), (64, 128, 4) at M = 128 the same


# --large (session 8, not yet timed): M = 256 / 512 on gemm_half2 (each 64- or 128-row tile decodes the weights once)
# against what the dispatch runs there, the words' dequant + cuBLAS (gemm.dequant_matmul); the 128-row tiles as
# 8-warp programs: two warp groups of 64 weight rows each per wgmma
LARGE = {
    256: [(64, 256, 4, 0, 2), (128, 256, 8, 0, 2), (128, 128, 8, 0, 2), (64, 128, 8, 0, 2)],
    512: [(64, 256, 4, 0, 2), (128, 256, 8, 0, 2), (128, 128, 8, 0, 2)],
}
# --narrow (session 11): M = 4 / 16 / 32 -- the 1-warp mma.sync table entry against 4- / 8-warp programs, where the
# dot is a wgmma with the unpacked weight tile as its register A operand (64 rows per warp group, N = BM = 16 / 32):
# one x^T tile in shared memory serves BN rows instead of 64, so the x bytes read from L2 per weight byte fall from
# 1.33 (BN 64, BM 16) to 0.67 / 0.33 at BN 128 / 256 -- at 8192^2 M = 16 the table's 1-warp programs read ~33 MB of
# x from L2 beside the 25 MB of words
NARROW = {
    16: [(16, 64, 1, 0, 2), (16, 64, 4, 0, 2), (16, 128, 4, 0, 2), (16, 128, 8, 0, 2), (16, 256, 8, 0, 2)],
    32: [(32, 64, 1, 0, 2), (32, 64, 4, 0, 2), (32, 128, 4, 0, 2), (32, 128, 8, 0, 2), (32, 256, 8, 0, 2)],
}


def bucket(m):
    return next((b for b in (16, 32, 64, 128, 256) if m <= b), 512)


def words_only(ps):
    """The weight copies without their bit planes (as prepare_weights leaves them on CUDA): the dispatch's M > 128
    path then dequantizes the words."""
    from quantease.kernels.prepare import drop_planes

    return [drop_planes(dict(q)) for q in ps]


def prepared(n, k, fraction, device, asym, seed=0):
    from quantease.kernels import gemv_half2

    p, _ = kb.make_prepared(n, k, 3, -1, fraction, device=device, seed=seed, asym=asym, planes="keep")
    if p.get("words") is None:  # CPU: prepare_weights builds the words on CUDA only
        gemv_half2.add_layout(p)
    return p


def shape_weights(args, shapes, t0, rotate, device):
    """(n, k, weight copies at 0%, at 0.5% outliers) per shape, until --deadline seconds after t0."""
    for n, k in shapes:
        if time.time() - t0 > args.deadline:
            print(f"deadline: {n}x{k} and later shapes skipped", flush=True)
            return
        yield n, k, rotate(prepared(n, k, 0.0, device, args.asym)), rotate(prepared(n, k, 0.005, device, args.asym))


def words_q4(p):
    """The same codes in the Q = 4 half2 layout (the GEMV's layout before Q = 8)."""
    from quantease.kernels.prepare import codes_from_planes, pack_half2

    k = p["in_features"]
    kb4 = (k + 127) // 128 * 128
    codes = torch.zeros(p["out_features"], kb4, dtype=torch.int32, device=p["plane0"].device)
    codes[:, :k] = codes_from_planes(p["plane0"], p["plane1"], 3, k)
    return dict(p, words=pack_half2(codes, 4), q=4)


def uint8_zeros(ps):
    """The weight copies with uint8 zeros: gemm_swap as the dispatch ran it before gemm_half2 (its 1-warp configs
    need them, see its doc)."""
    return [dict(q, zeros=None if q["zeros"] is None else q["zeros"].to(torch.uint8)) for q in ps]


def check(device, shapes, asym, cands, ms):
    from quantease.kernels import dequantize_prepared, gemm_half2

    bad = 0
    print("check: every candidate vs float64 (tolerance fp16 3e-3, bf16 1.5e-2), 0.5% outliers", flush=True)
    for n, k in shapes:
        p = prepared(n, k, 0.005, device, asym, seed=2)
        w64 = dequantize_prepared(p).double()
        errs = []
        for m in ms:
            for cfg in cands[bucket(m)]:
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(m, k, device=device).to(dtype)
                    out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
                    y = gemm_half2.qgemm_half2(x, p, None, out, cfg)
                    ref = x.double() @ w64.t()
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    ok = bool(torch.isfinite(y).all()) and err < (3e-3 if dtype == torch.float16 else 1.5e-2)
                    bad += not ok
                    if not ok:
                        errs.append(f"M={m} {cfg} {str(dtype)[6:]} {err:.1e} FAIL")
            errs.append(f"M={m} {err:.1e}")
        print(f"  {n}x{k}: " + ", ".join(errs), flush=True)
    print(f"check: {'all pass' if not bad else f'{bad} FAILED'}", flush=True)


def agree(p, m, ref_cfg, cfg, name, path=None):
    """gemm_half2 at cfg (and outlier_path) gives the table config's result (fp16 x, relative 1e-3: split-K atomics
    differ in order)."""
    from quantease.kernels import gemm_half2

    x = torch.randn(m, p["in_features"], device=p["scales"].device).half()
    y0 = gemm_half2.qgemm_half2(x, p, None, torch.empty(m, p["out_features"], device=x.device).half(), ref_cfg)
    y = gemm_half2.qgemm_half2(x, p, None, torch.full_like(y0, float("nan")), cfg, outlier_path=path)
    err = ((y.double() - y0.double()).norm() / y0.double().norm()).item()
    if not (err < 1e-3):
        print(f"  MISMATCH {name} {cfg} M={m}: relative {err:.1e} to the table config", flush=True)


def open_csv(args, stem, columns):
    """OUT/stem[_asym].csv opened for the rows of one mode, its header written: (file, csv writer)."""
    f = open(os.path.join(args.out, stem + ("_asym" if args.asym else "") + ".csv"), "w", newline="")
    w = csv.writer(f)
    w.writerow(["n", "k", "m", "fraction"] + columns + ["config", "us", "fp16_us", "speedup_vs_fp16"])
    return f, w


def outliers(args, time_kernel, time_fp16, rotate, device, shapes):
    """--outliers: the table config at 0% and at 0.5% outliers with the epilogue's variants: BR 1 / 4 slots per step,
    IL (the slot steps inside the K loop, one per block; BR 1 or the table's; session 12: sm_90 AOT at (16, 128, 4)
    95 -> 167 registers at BR 1, 116 -> 244 at BR 2); at M = 1 the GEMV's variants instead (gemv_loop()),
    OS = 1 / 2 / 4 outlier-only programs per weight tile beside the K splits (scheduled first), PRE = 2 / 4 slots
    per split loaded before the K loop, OF (session 14: all the split's slots added before the K loop, its first 1 /
    2 / all blocks' words L2-prefetched first; of2_br4 at 4 slots a step; always fused, also where the table adds
    them after the GEMM), and the epilogue
    alone (the K loop skipped: launch, x^T copy, zeroing, outlier adds, atomics).  Session 6 calls 4 and 6 and
    session 7 call 1 timed more (BR 2, x^T copy or gather from x forced, the split's slots prefetched into L2
    first, steps unrolled in commit c31b07b; results/kernels_half2.md)."""
    from quantease.kernels import gemm_half2

    f, w = open_csv(args, "half2_outliers", ["variant"])
    fp16, t0 = {}, time.time()
    want = set(args.variants.split(",")) if args.variants else None
    for n, k, p0, p5 in shape_weights(args, shapes, t0, rotate, device):
        for m in args.outlier_ms:
            base = time_fp16(n, k, m, fp16)
            if m == 1:  # the GEMV: its early slots (the table) against the slots inside the K loop
                gemv_loop(time_kernel, p0, p5, n, k, base, w, want)
                f.flush()
                continue
            tab = gemm_half2.pick_config(m)
            us0 = time_kernel(p0, m, lambda x, q, o: gemm_half2.qgemm_half2(x, q, None, o))
            w.writerow([n, k, m, 0.0, "half2", str(tab), f"{us0:.2f}", f"{base:.2f}", f"{base / us0:.3f}"])
            cells = []
            if want is None or "pf_all" in want:  # 0%: the split's words all L2-prefetched at the start (OF's half)
                cfg = tab[:5] + (None, 0, 0, 0, 0, 99)
                us = time_kernel(p0, m, lambda x, q, o, c=cfg: gemm_half2.qgemm_half2(x, q, None, o, c))
                w.writerow([n, k, m, 0.0, "half2_pf_all", str(cfg), f"{us:.2f}", f"{base:.2f}", f"{base / us:.3f}"])
                cells.append(f"0% pf_all {us:.1f} ({us / us0 - 1:+.0%})")
            # (name, config, gather_x, outliers_only, outlier_path): path "split" / "ell" adds them after the GEMM
            for name, cfg, gx, only, path in (("table", tab, None, False, None),
                                              ("split", tab, None, False, "split"),
                                              ("fused", tab, None, False, "fused"),
                                              ("ell", tab, None, False, "ell"),
                                              ("br4", tab[:5] + (4,), None, False, None),
                                              ("os1", tab[:5] + (None, 1), None, False, None),
                                              ("os2", tab[:5] + (None, 2), None, False, None),
                                              ("os4", tab[:5] + (None, 4), None, False, None),
                                              ("os2_br4", tab[:5] + (4, 2), None, False, None),
                                              ("pre2", tab[:5] + (None, 0, 2), None, False, None),
                                              ("pre4", tab[:5] + (None, 0, 4), None, False, None),
                                              ("br1", tab[:5] + (1,), None, False, None),
                                              ("il", tab[:5] + (None, 0, 0, 0, 1), None, False, None),
                                              ("il_br1", tab[:5] + (1, 0, 0, 0, 1), None, False, None),
                                              ("of1", tab[:5] + (None, 0, 0, 0, 0, 1), None, False, "fused"),
                                              ("of2", tab[:5] + (None, 0, 0, 0, 0, 2), None, False, "fused"),
                                              ("of_all", tab[:5] + (None, 0, 0, 0, 0, 99), None, False, "fused"),
                                              ("of2_br4", tab[:5] + (4, 0, 0, 0, 0, 2), None, False, "fused"),
                                              ("epilogue_alone", tab, None, True, None)):
                if want is not None and name not in want:
                    continue
                if not only:  # same sums as the table config (split-K atomics: not bit-equal)
                    agree(p5[0], m, tab, cfg, name, path)
                us = time_kernel(p5, m, lambda x, q, o, c=cfg, g=gx, e=only, op=path: gemm_half2.qgemm_half2(
                    x, q, None, o, c, gather_x=g, outliers_only=e, outlier_path=op))
                w.writerow([n, k, m, 0.005, "half2_" + name, str(cfg), f"{us:.2f}", f"{base:.2f}", f"{base / us:.3f}"])
                cells.append(f"{name} {us:.1f} ({us / us0 - 1:+.0%})")
            f.flush()
            print(f"| {n}x{k} | {m} | fp16 {base:.1f} | 0% {us0:.1f} | 0.5%: " + ", ".join(cells) + " |", flush=True)
    print(f"[{time.time() - t0:.0f}s] wrote {f.name}", flush=True)


def gemv_loop(time_kernel, p0, p5, n, k, base, w, want):
    """--outliers at M = 1 (session 12): gemv_half2 at 0% and at 0.5% with loop_outliers=False (the early slots, or
    after the loop), with loop_outliers=True (enough slots a K step to cover R) and with 8 a step; each checked
    against the default first."""
    from quantease.kernels import gemv_half2

    def run(kw):
        return lambda x, q, o: gemv_half2.qgemv_half2(x, gemv_half2.cached_layout(q), None, o, **kw)

    x = torch.randn(1, k, device=p5[0]["scales"].device).half()
    y0 = run({})(x, p5[0], torch.empty(1, n, device=x.device).half()).double()
    us0 = time_kernel(p0, 1, run({}))
    cfg = gemv_half2.pick_config(1, n, k, 8)
    w.writerow([n, k, 1, 0.0, "gemv", str(cfg), f"{us0:.2f}", f"{base:.2f}", f"{base / us0:.3f}"])
    cells = []
    for name, kw in (("gemv_table", {"loop_outliers": False}), ("gemv_loop", {"loop_outliers": True}),
                     ("gemv_loop8", {"loop_outliers": 8})):
        if want is not None and name not in want:
            continue
        y = run(kw)(x, p5[0], torch.full((1, n), float("nan"), device=x.device).half()).double()
        err = ((y - y0).norm() / y0.norm()).item()
        if not err < 1e-3:
            print(f"  MISMATCH {name} M=1: relative {err:.1e} to the table", flush=True)
        us = time_kernel(p5, 1, run(kw))
        w.writerow([n, k, 1, 0.005, name, str(cfg), f"{us:.2f}", f"{base:.2f}", f"{base / us:.3f}"])
        cells.append(f"{name} {us:.1f} ({us / us0 - 1:+.0%})")
    print(f"| {n}x{k} | 1 | fp16 {base:.1f} | 0% {us0:.1f} | 0.5%: " + ", ".join(cells) + " |", flush=True)


def prologue_ab(args, time_kernel, time_fp16, rotate, device, shapes):
    """--prologue: the table config at 0.5% outliers with gemm_half2.FUSED_PROLOGUE off (torch's x^T copy and fill:
    two launches) and on (kernels/prologue.py: one), at the M where both are needed (x^T gathered, K split)."""
    from quantease.kernels import gemm_half2

    def with_prologue(on, fn):
        old, gemm_half2.FUSED_PROLOGUE = gemm_half2.FUSED_PROLOGUE, on
        try:
            return fn()
        finally:
            gemm_half2.FUSED_PROLOGUE = old

    f, w = open_csv(args, "half2_prologue", ["variant"])
    fp16, t0 = {}, time.time()
    for n, k, p0, p5 in shape_weights(args, shapes, t0, rotate, device):
        for m in args.outlier_ms:
            base = time_fp16(n, k, m, fp16)
            x = torch.randn(m, k, device=device).half()
            # the same sums both ways (split-K atomics: not bit-equal)
            ys = [with_prologue(on, lambda: gemm_half2.qgemm_half2(
                x, p5[0], None, torch.full((m, n), float("nan"), device=device, dtype=x.dtype)).double())
                  for on in (False, True)]
            err = ((ys[1] - ys[0]).norm() / ys[0].norm()).item()
            cells = [f"agree {err:.0e}" + ("" if err < 1e-3 else " MISMATCH")]
            for name, on in (("two_launches", False), ("prologue", True)):
                us = with_prologue(on, lambda: time_kernel(p5, m, lambda x, q, o: gemm_half2.qgemm_half2(
                    x, q, None, o)))
                w.writerow([n, k, m, 0.005, "half2_" + name, str(gemm_half2.pick_config(m)), f"{us:.2f}",
                            f"{base:.2f}", f"{base / us:.3f}"])
                cells.append(f"{name} {us:.1f}")
            f.flush()
            print(f"| {n}x{k} | {m} | fp16 {base:.1f} | 0.5%: " + ", ".join(cells) + " |", flush=True)
    print(f"[{time.time() - t0:.0f}s] wrote {f.name}", flush=True)


# --regs (session 9): register caps per M bucket.  sm_90 AOT (triton 3.6, asymmetric per channel): (16, 64, 1)
# 168 registers (12 warps per SM), 194 with the outlier epilogue (10 warps); capped at 168 / 136 / 128 (12 / 15 / 16
# warps): 8-16 / 32-48 / 72-80 B of stack.  (32, 64, 1) 255 (8 warps), 216 / 200 (9 / 10 warps): no stack without
# outliers, 88 / 128 B with.  (64, 128, 4) 158 (3 programs per SM), 128: 16 B of stack (4 programs).
NREGS = {16: (None, 168, 136, 128), 32: (None, 216, 200), 64: (None, 128)}


def regs(args, time_kernel, time_fp16, rotate, device, shapes):
    """--regs: does the latency-bound K loop gain from more warps per SM, and is the outlier epilogue's cost its
    registers (194 vs 168 at (16, 64, 1): 10 instead of 12 warps per SM)?  The table config at each register cap,
    0% and 0.5% outliers (each variant checked against the uncapped config first)."""
    from quantease.kernels import gemm_half2, gemv_half2

    f, w = open_csv(args, "half2_regs", ["nreg"])
    fp16, t0 = {}, time.time()
    for n, k, p0, p5 in shape_weights(args, shapes, t0, rotate, device):
        for m in (2, 4, 16, 32, 64):
            base = time_fp16(n, k, m, fp16)
            tab = tuple(gemm_half2.pick_config(m))
            cells = []
            for nreg in NREGS[bucket(m)]:
                cfg = tab[:5] + (None, 0, 0, nreg)
                agree(p5[0], m, tab, cfg, f"nreg {nreg}")
                us = [time_kernel(ps, m, lambda x, q, o, c=cfg: gemm_half2.qgemm_half2(x, q, None, o, c))
                      for ps in (p0, p5)]
                for frac, u in zip((0.0, 0.005), us):
                    w.writerow([n, k, m, frac, nreg or 0, str(cfg), f"{u:.2f}", f"{base:.2f}", f"{base / u:.3f}"])
                cells.append(f"{nreg or 'auto'}: {us[0]:.1f} / {us[1]:.1f} ({us[1] / us[0] - 1:+.0%})")
            # the outliers after the (uncapped) GEMM instead of in its epilogue: one ELL program per column block,
            # or the split kernel's many short programs
            for path in ("ell", "split"):
                u = time_kernel(p5, m, lambda x, q, o, c=tab, pa=path: gemm_half2.qgemm_half2(
                    x, q, None, o, c, outlier_path=pa))
                w.writerow([n, k, m, 0.005, 0, f"{tab} {path}", f"{u:.2f}", f"{base:.2f}", f"{base / u:.3f}"])
                cells.append(f"{path}: {u:.1f}")
            f.flush()
            print(f"| {n}x{k} | {m} | fp16 {base:.1f} | 0% / 0.5%: " + ", ".join(cells) + " |", flush=True)
        # M = 1, the half2 GEMV: (8, 8, 1) 188 registers, 255 + 8 B of stack with the outliers' early slots (8 / 10
        # warps per SM); capped at 192 with outliers: 64 B of stack (10 warps)
        base, cells = time_fp16(n, k, 1, fp16), []
        for nreg in (None, 192):
            us = [time_kernel(ps, 1, lambda x, q, o, r=nreg: gemv_half2.qgemv_half2(
                x, gemv_half2.cached_layout(q), None, o, nreg=r)) for ps in (p0, p5)]
            for frac, u in zip((0.0, 0.005), us):
                w.writerow([n, k, 1, frac, nreg or 0, "gemv", f"{u:.2f}", f"{base:.2f}", f"{base / u:.3f}"])
            cells.append(f"{nreg or 'auto'}: {us[0]:.1f} / {us[1]:.1f} ({us[1] / us[0] - 1:+.0%})")
        print(f"| {n}x{k} | 1 (GEMV) | fp16 {base:.1f} | 0% / 0.5%: " + ", ".join(cells) + " |", flush=True)
    print(f"[{time.time() - t0:.0f}s] wrote {f.name}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--asym", action="store_true", help="random per-channel zeros (quantease's default grid)")
    ap.add_argument("--deadline", type=float, default=400.0, help="seconds after which no new shape is started")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run under TRITON_INTERPRET=1, timers stubbed")
    ap.add_argument("--outliers", action="store_true", help="only the 0.5%%-outlier epilogue variants (table config)")
    ap.add_argument("--shapes", default="", help="NxK,NxK,... instead of SHAPES (GPU runs)")
    ap.add_argument("--variants", default="", help="--outliers: only these variants (comma-separated names)")
    ap.add_argument("--outlier-ms", default="2,4,8,16,32", help="--outliers: M values")
    ap.add_argument("--prologue", action="store_true",
                    help="only the fused prologue (x^T copy + zeroing in one launch) against two launches, 0.5%%")
    ap.add_argument("--regs", action="store_true", help="only the table config under register caps (NREG)")
    ap.add_argument("--wide", action="store_true", help="only M = 64, 128: the 4- / 8-warp candidates vs gemm_swap")
    ap.add_argument("--narrow", action="store_true",
                    help="only M = 4, 16, 32: the 1-warp table entry vs 4- / 8-warp (wgmma) candidates")
    ap.add_argument("--large", action="store_true",
                    help="only M = 256, 512: gemm_half2 candidates vs the words' dequant + cuBLAS")
    ap.add_argument("--ms", default="", help="--narrow / --wide / --large: these M values instead of the mode's (each "
                    "times its bucket's candidates; e.g. --narrow --ms 2)")
    args = ap.parse_args()
    args.outlier_ms = [int(m) for m in args.outlier_ms.split(",")]
    os.makedirs(args.out, exist_ok=True)
    from quantease.kernels import gemm, gemm_half2, gemm_swap, gemv_half2

    t0 = time.time()
    device, shapes = "cuda", (tuple(tuple(int(v) for v in x.split("x")) for x in args.shapes.split(","))
                              if args.shapes else SHAPES)
    rotate, time_kernel, time_fp16 = kb.rotated_timers(args.tiny)
    if args.tiny:
        device, shapes = "cpu", ((40, 600), (72, 300))
    else:
        print(torch.cuda.get_device_name(), torch.__version__, __import__("triton").__version__, flush=True)
    if args.outliers:
        return outliers(args, time_kernel, time_fp16, rotate, device, shapes)
    if args.prologue:
        return prologue_ab(args, time_kernel, time_fp16, rotate, device, shapes)
    if args.regs:
        return regs(args, time_kernel, time_fp16, rotate, device, shapes)
    cands, ms, check_ms = ((WIDE, (64, 128), (64, 65, 128)) if args.wide else
                           (LARGE, (256, 512), (256, 257, 512)) if args.large else
                           (NARROW, (4, 16, 32), (3, 16, 17, 32)) if args.narrow else (CANDS, MS, MS))
    if args.ms:
        ms = check_ms = tuple(int(m) for m in args.ms.split(","))
    check(device, shapes[:2], args.asym, cands, check_ms)
    print(f"[{time.time() - t0:.0f}s] weights: {'asymmetric' if args.asym else 'symmetric'}, 3-bit per channel",
          flush=True)
    f, w = open_csv(args, "half2_gemm", ["variant"])
    fp16 = {}

    def row(n, k, m, frac, name, cfg, us, base):
        w.writerow([n, k, m, frac, name, str(cfg), f"{us:.2f}", f"{base:.2f}", f"{base / us:.3f}"])

    def swap(x, q, o):
        return gemm_swap.qgemm_swap(x, q, None, o)

    def dequant(x, q, o):
        return gemm.dequant_matmul(x, q, None, o)

    # the baseline: what the dispatch ran before (gemm_swap on the planes, uint8 zeros), or runs now (M > 128)
    base_name, base_fn, base_copy = (("dequant", dequant, words_only) if args.large else
                                     ("swap_table", swap, uint8_zeros))
    for n, k, p0, p5 in shape_weights(args, shapes, t0, rotate, device):
        p0u = base_copy(p0)
        for m in ms:
            base = time_fp16(n, k, m, fp16)
            old = time_kernel(p0u, m, base_fn)
            row(n, k, m, 0.0, "fp16", "", base, base)
            row(n, k, m, 0.0, base_name, gemm_swap.pick_config(m) if base_fn is swap else "", old, base)
            res = []
            for cfg in cands[bucket(m)]:
                try:
                    us = time_kernel(p0, m, lambda x, q, o, c=cfg: gemm_half2.qgemm_half2(x, q, None, o, c))
                except Exception as e:  # a config the compiler rejects (shared memory, registers)
                    print(f"  {cfg} failed: {str(e).splitlines()[0][:100]}", flush=True)
                    continue
                res.append((us, cfg))
                row(n, k, m, 0.0, "half2", cfg, us, base)
            us0, cfg0 = min(res)
            us5 = time_kernel(p5, m, lambda x, q, o: gemm_half2.qgemm_half2(x, q, None, o, cfg0))
            row(n, k, m, 0.005, "half2", cfg0, us5, base)
            swap5 = ""
            if args.wide or args.large:  # the baseline with the outliers too
                p5u = base_copy(p5)
                old5 = time_kernel(p5u, m, base_fn)
                row(n, k, m, 0.005, base_name, gemm_swap.pick_config(m) if base_fn is swap else "", old5, base)
                swap5 = f" | {base_name} 0.5% {old5:.1f}"
                del p5u
            f.flush()
            print(f"| {n}x{k} | {m} | fp16 {base:.1f} | {base_name} {old:.1f} | half2 "
                  + " ".join(f"{u:.1f}" for u, _ in res)
                  + f" | best {cfg0} {us0:.1f} = {base / us0:.2f}x fp16, {old / us0:.2f}x {base_name} | 0.5% {us5:.1f} "
                  f"({us5 / us0 - 1:+.0%}){swap5} |", flush=True)
        if args.wide or args.large or args.narrow:
            del p0u
            continue
        # the GEMV on both word layouts (same codes), table configs
        for m in (1, 2):
            base = time_fp16(n, k, m, fp16)
            q8 = time_kernel(p0, m, lambda x, q, o: gemv_half2.qgemv_half2(x, gemv_half2.cached_layout(q), None, o))
            p4 = [words_q4(q) for q in p0]
            q4 = time_kernel(p4, m, lambda x, q, o: gemv_half2.qgemv_half2(x, q, None, o))
            del p4
            row(n, k, m, 0.0, "gemv_q8", gemv_half2.pick_config(m, n, k, 8), q8, base)
            row(n, k, m, 0.0, "gemv_q4", gemv_half2.pick_config(m, n, k, 4), q4, base)
            print(f"| {n}x{k} | {m} | fp16 {base:.1f} | GEMV Q=4 {q4:.1f} | Q=8 {q8:.1f} ({q8 / q4 - 1:+.1%}) |",
                  flush=True)
        del p0u
    print("candidates: " + "; ".join(f"{b}: " + ", ".join(f"{i}={c}" for i, c in enumerate(cands[b])) for b in cands))
    print(f"[{time.time() - t0:.0f}s] wrote {f.name}", flush=True)


if __name__ == "__main__":
    main()
