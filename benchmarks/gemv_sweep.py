"""GEMV config sweep (issue 5): v1 (kernels/gemv.py) and v2 half2 (kernels/gemv_half2.py) at M = 1, 2, 4, 8 on the
Llama-3-8B layer shapes and the benchmark shapes, against fp16 F.linear (cuBLAS) in the same run.

    PYTHONPATH=$PWD python3 benchmarks/gemv_sweep.py --deadline 450 --out $OUT        # one H100 call, ~7 min
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/gemv_sweep.py --tiny --out /tmp/s   # CPU dry run
    PYTHONPATH=$PWD python3 benchmarks/gemv_sweep.py --focus --deadline 400 --out $OUT       # session 2, ~5 min
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/gemv_sweep.py --focus --tiny --out /tmp/s
    PYTHONPATH=$PWD python3 benchmarks/gemv_sweep.py --hints --shapes 8192x8192,28672x8192,4096x4096,4096x14336 \
        --ms 1 --deadline 170 --out $OUT                                                # session 3, ~3 min
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/gemv_sweep.py --hints --tiny --ms 1 --out /tmp/s
    PYTHONPATH=$PWD python3 benchmarks/gemv_sweep.py --pipe --shapes 8192x8192,28672x8192,4096x4096,4096x14336 \
        --ms 1,2 --deadline 330 --out $OUT                                              # session 4, ~1 min

--pipe (session 4): the same procedure over PIPE_M1 / PIPE_M2: the K loop's loads software-pipelined by triton
(cp.async into shared memory, prefetch 0) at several depths and step sizes.

--hints (session 3) times, per shape at M = 1, fp16, the default (pick_config) and the candidates of HINT_M1:
pinned register loads (pin: a barrier keeps ptxas from sinking the next step's loads below the math), L2 / L1
cache hints `lead` steps ahead, smaller steps with deeper prefetch; every candidate is first checked on a
NaN-poisoned output against a float64 reference.  Then the default and the best candidate again at 0% and 0.5%
outliers (back to back), M = 2 candidates (HINT_M2), and a summary table.

--focus (session 2) runs, after the same compile pool and float64 check: (a) memory probes at 8192 x 8192 (the
(8, 16, 1) word pattern with no math; the same bytes read contiguously) -- how fast the loads alone go; (b) the
8192 x 8192 candidates (BN 4, prefetch 2 steps, 32 words / thread) beside today's best; (c) the outlier epilogue
before / after the K loop at 0.5% (paired with 0%); (d) the default table (pick_config) on every shape at M = 1, 2
against fp16, v1's default beside it: the numbers for results/kernels_gemv.md.

Order (so that a --deadline cut still leaves the most useful rows):
 1. a pool of worker processes compiles every (variant, config, M, outliers) job by running it once (Triton's
    disk cache then serves the timing process: ~1-3 s per compile, done 14 at a time) while the main process
    checks v1 and half2 against the float64 reference on every shape at M = 1, 2, 4 (+ half2 at M = 8);
 2. M = 1, every shape: every v1 and half2 config (each one first checked against an fp32 reference on a
    NaN-poisoned output), then the best 2 configs per variant again beside the same config with 0.5% outliers;
 3. M = 2, 4, 8, every shape: a smaller config grid (v1 takes M <= 4).
Timing: kernels.py's method -- one CUDA graph calls the kernel once per weight copy, copies rotating over
>= 512 MB (L2 cold); median of 20 replays / copies.  fp16 F.linear is timed twice per (shape, M), the faster
one is the baseline (it moved +-15% between two reads in earlier runs).  GB/s counts codes + scales + outlier
slots + x + y.  Every timed config goes to gemv_sweep.csv; the log repeats stdout.
"""
import argparse
import csv
import itertools
import math
import multiprocessing as mp
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import copies, graph_time, make_prepared, n_copies, weight_bytes  # noqa: E402

# (N, K): the two issue-5 targets first, then Llama-3-8B (qkv, o, gate_up, down), then the other benchmark shapes
SHAPES = ((8192, 8192), (28672, 8192), (4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (11008, 4096),
          (4096, 11008), (8192, 28672))
TINY_SHAPES = ((72, 1024), (40, 800))
FRACTION = 0.005


def _per_thread(bn, words, warps):
    return bn * words / (32 * warps)


def v1_configs(m, tiny=False):
    """(BN, 256-column blocks per step, warps, stages) + kwargs: tile words per thread (16 words / block) kept in
    {4, 8, 16} (v1 at 16 already uses 255 registers)."""
    if tiny:
        return [((16, 1, 1, 3), {}), ((8, 2, 1, 3), {"prefetch": False})]
    out = []
    grid = itertools.product((8, 16, 32, 64), (1, 2, 4, 8), (1, 2, 4, 8)) if m == 1 else \
        itertools.product((8, 16, 32), (2, 4), (1, 2, 4))
    for bn, bkb, warps in grid:
        if _per_thread(bn, 16 * bkb, warps) in ((4, 8, 16) if m <= 2 else (4, 8)):
            out.append(((bn, bkb, warps, 3), {}))
    if m == 1:  # what the loop pipeliner and the register prefetch do for today's default
        out += [((32, 4, 4, 1), {}), ((32, 4, 4, 3), {"prefetch": False}), ((8, 4, 1, 1), {})]
    return out


def half2_configs(m, tiny=False):
    """(BN, 128-column blocks per step, warps[, stages]) + kwargs: words per thread per role (4 / block) in
    {2, 4, 8, 16} at M = 1 ({2, 4, 8} above)."""
    if tiny:
        return [((16, 2, 1), {}), ((8, 4, 1, 1), {"prefetch": False})]
    out = []
    grid = itertools.product((8, 16, 32, 64, 128), (2, 4, 8, 16, 32), (1, 2, 4, 8, 16)) if m == 1 else \
        itertools.product((8, 16, 32), (4, 8, 16), (1, 2, 4, 8))
    for bn, bkb, warps in grid:
        if _per_thread(bn, 4 * bkb, warps) in ((2, 4, 8, 16) if m == 1 else (2, 4, 8)):
            out.append(((bn, bkb, warps), {}))
    if m == 1:
        out += [((16, 16, 8, 1), {}), ((32, 8, 4, 1), {}), ((16, 16, 8), {"prefetch": False}),
                ((32, 8, 4), {"prefetch": False})]
    return out


def configs(variant, m, tiny=False):
    if variant == "v1":
        return v1_configs(m, tiny) if m <= 4 else []
    return half2_configs(m, tiny)


def runner(variant, cfg, kw):
    from quantease.kernels import gemv, gemv_half2

    if variant == "v1":
        return lambda x, q, o: gemv.qgemv(x, q, None, o, cfg, **kw)
    return lambda x, q, o: gemv_half2.qgemv_half2(x, q, None, o, cfg, **kw)


def cfg_name(cfg, kw):
    return "(" + ",".join(map(str, cfg)) + ")" + "".join(f" {k}={v}" for k, v in kw.items())


def layouts(n, k, fraction, device):
    """{"v1": prepare_weights' dict, "half2": its half2 layout} for random 3-bit per-channel codes."""
    from quantease.kernels.prepare import half2_from_prepared

    p, _ = make_prepared(n, k, 3, -1, fraction, device=device)
    return {"v1": p, "half2": half2_from_prepared(p)}


# ---- phase 1 helpers: compile in worker processes ----

def _worker_init():
    torch.set_num_threads(1)


_WCACHE = {}


def _worker_job(job):
    """Run one (K, fraction, M, variant, config) once on a 256-row proxy of the layer: compiles it into Triton's
    disk cache.  The kernels specialize on K (divisibility, EVEN_K) and never on N beyond N % 16 (16 | every N
    here), so the timing process's call on the full layer hits the same cache entry."""
    k, fraction, m, variant, cfg, kw = job
    try:
        key = (k, fraction)
        if key not in _WCACHE:
            _WCACHE.clear()
            _WCACHE[key] = layouts(PROXY_N, k, fraction, _DEVICE)
        q = _WCACHE[key][variant]
        x = torch.randn(m, k, device=_DEVICE, dtype=torch.float16)
        out = torch.empty(m, PROXY_N, device=_DEVICE, dtype=torch.float16)
        runner(variant, cfg, kw)(x, q, out)
        if _DEVICE == "cuda":
            torch.cuda.synchronize()
        return job, None
    except Exception as e:  # a config the compiler rejects (registers, shared memory): reported, then skipped
        return job, (str(e).strip().splitlines() or ["?"])[-1][:160]


PROXY_N = 256
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Log:
    def __init__(self, path):
        self.f = open(path, "w")
        self.t0 = time.time()

    def __call__(self, *a):
        s = " ".join(str(v) for v in a)
        print(s, flush=True)
        self.f.write(s + "\n")
        self.f.flush()

    def elapsed(self):
        return time.time() - self.t0


def timed(calls, device):
    if device == "cuda":
        return graph_time(calls)
    t = time.perf_counter()  # CPU dry run: the code path only, the number means nothing
    for c in calls:
        c()
    return (time.perf_counter() - t) * 1e6 / len(calls)


def time_fp16(n, k, m, device):
    w = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
    ws = [w] + [w.clone() for _ in range(n_copies(w.numel() * 2) - 1)] if device == "cuda" else [w]
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    us = timed([lambda w=w: F.linear(x, w) for w in ws], device)
    del ws, w
    return us


def rel_err(y, ref):
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y.double() - ref).norm() / ref.norm()).item()


def check_reference(log, shapes, device, deadline):
    """v1 and half2 (their default configs) vs float64, fp16 x, 0.5% outliers, M = 1, 2, 4 (+ half2 M = 8)."""
    from quantease.kernels import dequantize_prepared

    log("check: relative error vs float64 reference, 3-bit per channel + 0.5% outliers, fp16 x (bar 3e-3)")
    bad = 0
    for n, k in shapes:
        if log.elapsed() > deadline:
            log("check: deadline reached")
            break
        lay = layouts(n, k, FRACTION, device)
        w64 = dequantize_prepared(lay["v1"]).double()
        line = []
        for m in (1, 2, 4, 8):
            x = torch.randn(m, k, device=device).half()
            ref = x.double() @ w64.t()
            for variant in ("v1", "half2"):
                if variant == "v1" and m > 4:
                    continue
                out = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                err = rel_err(runner(variant, None, {})(x, lay[variant], out), ref)
                ok = err < 3e-3
                bad += not ok
                line.append(f"{variant} M={m} {err:.1e}{'' if ok else ' FAIL'}")
        log(f"  {n}x{k}: " + ", ".join(line))
        del w64, lay
    log(f"check: {'all passed' if bad == 0 else f'{bad} FAILED'}  [{log.elapsed():.0f}s]")
    return bad


def sweep_shape(log, writer, n, k, ms, device, tiny, deadline, fp16_cache, outliers):
    """Every config of both variants at each M of ms on one shape; returns {(m, variant): [(us, cfg, kw)]}."""
    lay = layouts(n, k, 0.0, device)
    ncp = n_copies(weight_bytes(lay["half2"])) if device == "cuda" else 1
    reps = {v: copies(q, ncp) for v, q in lay.items()}
    from quantease.kernels import dequantize_prepared

    wf = dequantize_prepared(lay["v1"])  # fp32 reference weight, for the per-config check
    results = {}
    for m in ms:
        key = (n, k, m)
        if key not in fp16_cache:
            fp16_cache[key] = [time_fp16(n, k, m, device)]
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        ref = (x.float() @ wf.t()).double()
        for variant in ("half2", "v1"):
            for cfg, kw in configs(variant, m, tiny):
                if log.elapsed() > deadline:
                    log(f"  deadline reached at {n}x{k} M={m} {variant}")
                    return results, True
                run = runner(variant, cfg, kw)
                out = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                try:
                    err = rel_err(run(x, lay[variant], out), ref)
                    us = timed([lambda q=q: run(x, q, out) for q in reps[variant]], device)
                except Exception as e:
                    log(f"  {variant} {cfg_name(cfg, kw)} M={m} failed: {(str(e).strip().splitlines() or ['?'])[-1][:100]}")
                    continue
                if not err < 3e-3:
                    log(f"  {variant} {cfg_name(cfg, kw)} {n}x{k} M={m} WRONG: rel err {err:.2e} (not ranked)")
                gbs = (weight_bytes(lay[variant]) + 2 * m * (n + k)) / us / 1e3
                base = fp16_cache[key][0]
                writer.writerow(["sweep", n, k, m, 0.0, variant, cfg_name(cfg, kw), f"{us:.2f}", f"{gbs:.0f}",
                                 f"{base / us:.3f}", f"{base:.2f}", f"{err:.2e}"])
                if err < 3e-3:
                    results.setdefault((m, variant), []).append((us, cfg, kw))
        fp16_cache[key].append(time_fp16(n, k, m, device))  # second read of the baseline, after the sweep
        for variant in ("half2", "v1"):
            r = sorted(results.get((m, variant), []), key=lambda t: t[0])
            if r:
                log(f"  {n}x{k} M={m} {variant:5s} best {r[0][0]:7.2f} us {cfg_name(r[0][1], r[0][2]):22s} "
                    f"2nd {r[1][0] if len(r) > 1 else float('nan'):7.2f} us  ({len(r)} configs)")
        log(f"  {n}x{k} M={m} fp16 {' / '.join(f'{t:.1f}' for t in fp16_cache[key])} us  [{log.elapsed():.0f}s]")
    del wf
    if outliers:  # best 2 per variant at M = 1: 0% and 0.5% outliers back to back (paired: same run, same config)
        lay_o = layouts(n, k, FRACTION, device)
        reps_o = {v: copies(q, ncp) for v, q in lay_o.items()}
        for m in ms[:1]:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            out = torch.empty(m, n, device=device, dtype=torch.float16)
            for variant in ("half2", "v1"):
                for us0, cfg, kw in sorted(results.get((m, variant), []), key=lambda t: t[0])[:2]:
                    if log.elapsed() > deadline:
                        return results, True
                    run = runner(variant, cfg, kw)
                    t0 = timed([lambda q=q: run(x, q, out) for q in reps[variant]], device)
                    t5 = timed([lambda q=q: run(x, q, out) for q in reps_o[variant]], device)
                    base = min(fp16_cache[(n, k, m)])
                    gbs = (weight_bytes(lay_o[variant]) + 2 * m * (n + k)) / t5 / 1e3
                    writer.writerow(["outliers", n, k, m, FRACTION, variant, cfg_name(cfg, kw), f"{t5:.2f}",
                                     f"{gbs:.0f}", f"{base / t5:.3f}", f"{base:.2f}", f"paired_0pct={t0:.2f}"])
                    log(f"  {n}x{k} M={m} {variant:5s} {cfg_name(cfg, kw):22s} 0%: {t0:6.2f} us  0.5%: {t5:6.2f} us "
                        f"(+{(t5 / t0 - 1) * 100:.0f}%)  {base / t5:.2f}x fp16")
                    results.setdefault(("outl", m, variant), []).append((t0, t5, cfg, kw))
        del reps_o
    return results, False


# ---- --focus (session 2): probes, 8192^2 candidates, outlier epilogue A/B, the default table ----

@triton.jit
def probe_roles_kernel(w_ptr, y_ptr, stride_w, STEPS, BN: tl.constexpr, BKB: tl.constexpr, Q: tl.constexpr):
    """gemv_half2's word loads (three [BN, Q * BKB] role tiles per step, next step loaded before this one is used,
    evict_first) with an XOR instead of the math: the speed of the access pattern alone."""
    BKW: tl.constexpr = Q * BKB
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    w = tl.arange(0, BKW)
    w_row = w_ptr + offs_n[:, None] * stride_w + (w + (w // Q) * (2 * Q))[None, :]
    SW: tl.constexpr = 3 * BKW
    acc = tl.zeros((BN, BKW), dtype=tl.int32)
    n0 = tl.load(w_row, eviction_policy="evict_first")
    n1 = tl.load(w_row + Q, eviction_policy="evict_first")
    n2 = tl.load(w_row + 2 * Q, eviction_policy="evict_first")
    for t in range(0, STEPS):
        a0, a1, a2 = n0, n1, n2
        nxt = w_row + (t + 1) * SW
        more = tl.full((BN, BKW), t + 1, tl.int32) < STEPS  # no load past the last step
        n0 = tl.load(nxt, mask=more, other=0, eviction_policy="evict_first")
        n1 = tl.load(nxt + Q, mask=more, other=0, eviction_policy="evict_first")
        n2 = tl.load(nxt + 2 * Q, mask=more, other=0, eviction_policy="evict_first")
        acc = acc ^ a0 ^ (a1 + a2)
    tl.store(y_ptr + offs_n, tl.sum(acc, axis=1))


@triton.jit
def probe_flat_kernel(w_ptr, y_ptr, STEPS, CH: tl.constexpr):
    """The same bytes per program read as one contiguous run: STEPS x 3 loads of CH words (16-byte loads, the next
    step loaded before this one is used)."""
    base = w_ptr + tl.program_id(0).to(tl.int64) * (STEPS * 3 * CH) + tl.arange(0, CH)
    acc = tl.zeros((CH,), dtype=tl.int32)
    n0 = tl.load(base, eviction_policy="evict_first")
    n1 = tl.load(base + CH, eviction_policy="evict_first")
    n2 = tl.load(base + 2 * CH, eviction_policy="evict_first")
    for t in range(0, STEPS):
        a0, a1, a2 = n0, n1, n2
        nxt = base + (t + 1) * (3 * CH)
        more = tl.full((CH,), t + 1, tl.int32) < STEPS
        n0 = tl.load(nxt, mask=more, other=0, eviction_policy="evict_first")
        n1 = tl.load(nxt + CH, mask=more, other=0, eviction_policy="evict_first")
        n2 = tl.load(nxt + 2 * CH, mask=more, other=0, eviction_policy="evict_first")
        acc = acc ^ a0 ^ (a1 + a2)
    tl.store(y_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def probe_calls(q2, bn, bkb, warps):
    """(name, call) pairs for the two probes on half2 dict q2, tiled like config (bn, bkb, warps)."""
    words = q2["words"]
    n, wpr = words.shape
    qq = q2["q"]
    steps = wpr // (3 * qq * bkb)
    y = torch.empty(n, dtype=torch.int32, device=words.device)
    ch = bn * qq * bkb
    grid_f = (words.numel() // (3 * ch * steps),)
    return [(f"roles ({bn},{bkb},{warps})", lambda: probe_roles_kernel[(triton.cdiv(n, bn),)](
                words, y, words.stride(0), steps, BN=bn, BKB=bkb, Q=qq, num_warps=warps)),
            (f"flat {3 * ch * 4} B x {steps}", lambda: probe_flat_kernel[grid_f](words, y, steps, CH=ch,
                                                                              num_warps=warps))]


FOCUS_SHAPES = ((8192, 8192), (28672, 8192), (4096, 4096))
FOCUS_M1 = [((8, 16, 1), {}), ((8, 16, 1), {"prefetch": 2}), ((8, 8, 1), {"prefetch": 2}), ((4, 16, 1), {}),
            ((4, 16, 1), {"prefetch": 2}), ((4, 8, 1), {"prefetch": 2}), ((4, 32, 1), {}), ((8, 32, 1), {}),
            ((16, 8, 2), {"prefetch": 2}), ((32, 4, 1), {}), ((32, 4, 1), {"prefetch": 2}),
            # whole rows per step (K = 8192: 64 blocks): each warp reads 2 / 4 / 8 rows as one contiguous run
            ((2, 64, 1), {}), ((4, 64, 2), {}), ((8, 64, 4), {}), ((2, 32, 1), {"prefetch": 2}), ((4, 32, 2), {})]
OUTLIER_SHAPES = ((4096, 4096), (6144, 4096), (4096, 14336), (4096, 11008), (8192, 8192), (28672, 8192))
TINY_FOCUS = [((8, 2, 1), {}), ((8, 2, 1), {"prefetch": 2}), ((4, 2, 1), {})]


# session 3 (--hints): the next step's register loads sit at ~70% of the step's math in the SASS (ptxas sinks them
# under register pressure); pin / lead put the DRAM requests at the step's top (benchmarks/kernel_notes.md)
HINT_M1 = [((8, 16, 1), {}), ((8, 16, 1), {"pin": True}), ((8, 16, 1), {"lead": 1}), ((8, 16, 1), {"lead": 2}),
           ((8, 16, 1), {"lead": 1, "level": 1}), ((8, 16, 1), {"pin": True, "lead": 2}),
           ((8, 16, 1), {"pin": True, "prefetch": 2}),
           # x: the step's x loads wait behind the weights' DRAM traffic when x has left L1
           ((8, 16, 1), {"xhint": True}), ((8, 16, 1), {"cg": True}), ((8, 16, 1), {"pin": True, "xhint": True}),
           ((8, 16, 1), {"pin": True, "cg": True}), ((8, 16, 1), {"pin": True, "cg": True, "xhint": True}),
           ((8, 8, 1), {}), ((8, 8, 1), {"pin": True, "prefetch": 2}), ((8, 8, 1), {"lead": 2}),
           ((8, 8, 1), {"xhint": True}), ((8, 8, 1), {"cg": True}),
           ((8, 8, 1), {"pin": True, "prefetch": 2, "xhint": True}),
           ((8, 8, 1), {"pin": True, "prefetch": 2, "lead": 3}), ((8, 8, 1), {"pin": True, "prefetch": 2, "cg": True}),
           ((8, 4, 1), {"pin": True, "prefetch": 2}), ((8, 4, 1), {"pin": True, "prefetch": 2, "xhint": True}),
           ((4, 16, 1), {"pin": True}), ((4, 16, 1), {"pin": True, "prefetch": 2, "xhint": True}),
           ((16, 8, 1), {"pin": True}), ((8, 32, 1), {"pin": True}), ((8, 32, 1), {"lead": 1}),
           ((32, 4, 1), {}), ((32, 4, 1), {"pin": True}), ((32, 4, 1), {"lead": 2}), ((32, 4, 1), {"xhint": True}),
           ((32, 4, 1), {"pin": True, "xhint": True}), ((32, 4, 1), {"pin": True, "prefetch": 2}),
           ((8, 16, 2), {"pin": True}), ((32, 16, 4), {"pin": True}), ((16, 16, 2), {"pin": True, "xhint": True})]
HINT_M2 = [((8, 16, 2), {}), ((8, 16, 2), {"pin": True}), ((8, 16, 2), {"lead": 1}), ((8, 16, 2), {"xhint": True}),
           ((16, 4, 1), {}), ((16, 4, 1), {"pin": True}), ((16, 4, 1), {"lead": 2}), ((16, 4, 1), {"xhint": True}),
           ((8, 8, 1), {"pin": True, "prefetch": 2}), ((8, 8, 1), {"pin": True, "prefetch": 2, "xhint": True})]
TINY_HINTS = [((8, 2, 1), {}), ((8, 2, 1), {"pin": True}), ((8, 2, 1), {"lead": 1}),
              ((8, 1, 1), {"pin": True, "prefetch": 2, "lead": 3, "cg": True, "xhint": True})]


# session 4 (--pipe): prefetch 0 and triton's software pipeliner on the K loop (tl.range num_stages = pipe): the
# words and x of step t + pipe - 1 leave as cp.async copies into shared memory at step t's top (SASS: LDGSTS),
# holding no registers, so ptxas cannot sink them as it sinks the register prefetch.  Shared memory per 1-warp
# program: (pipe - 1) x (words 12 BN BKB + x 256 BKB bytes) -- (8, 16, 1) pipe 3 20 KB, pipe 4 30 KB (7 / SM).
PIPE_M1 = [((8, 16, 1), {}), ((8, 16, 1, 3, 0), {"pipe": 2}), ((8, 16, 1, 3, 0), {"pipe": 3}),
           ((8, 16, 1, 3, 0), {"pipe": 4}), ((8, 8, 1, 3, 0), {"pipe": 3}), ((8, 8, 1, 3, 0), {"pipe": 4}),
           ((8, 8, 1, 3, 0), {"pipe": 5}), ((16, 8, 1, 3, 0), {"pipe": 3}), ((16, 8, 1, 3, 0), {"pipe": 4}),
           ((8, 4, 1, 3, 0), {"pipe": 4}), ((8, 4, 1, 3, 0), {"pipe": 6}), ((4, 16, 1, 3, 0), {"pipe": 3}),
           ((4, 8, 1, 3, 0), {"pipe": 3}), ((4, 8, 1, 3, 0), {"pipe": 4}), ((32, 4, 1), {}),
           ((32, 4, 1, 3, 0), {"pipe": 2}), ((32, 4, 1, 3, 0), {"pipe": 3}), ((32, 4, 1, 3, 0), {"pipe": 4}),
           ((16, 4, 1, 3, 0), {"pipe": 4}), ((16, 16, 2, 3, 0), {"pipe": 3}), ((8, 32, 4, 3, 0), {"pipe": 2}),
           ((32, 8, 4, 3, 0), {"pipe": 3})]
PIPE_M2 = [((8, 16, 2), {}), ((8, 16, 2, 3, 0), {"pipe": 3}), ((16, 4, 1), {}), ((16, 4, 1, 3, 0), {"pipe": 3}),
           ((16, 4, 1, 3, 0), {"pipe": 4}), ((8, 8, 1, 3, 0), {"pipe": 3}), ((8, 8, 1, 3, 0), {"pipe": 4}),
           ((8, 16, 1, 3, 0), {"pipe": 3})]
TINY_PIPE = [((8, 2, 1), {}), ((8, 2, 1, 3, 0), {"pipe": 3}), ((8, 1, 1, 3, 0), {"pipe": 4})]
CANDIDATES = {"hints": (HINT_M1, HINT_M2, TINY_HINTS), "pipe": (PIPE_M1, PIPE_M2, TINY_PIPE)}


def candidates(mode, m, tiny):
    m1, m2, tiny_c = CANDIDATES[mode]
    return tiny_c if tiny else (m1 if m == 1 else m2)


def hint_jobs(shapes, ms, tiny, mode="hints"):
    """Compile-pool jobs for --hints / --pipe (explicit configs; with 0.5% outliers only the default: the best
    candidate's outlier kernel compiles on first use)."""
    from quantease.kernels import gemv_half2

    jobs = set()
    for n, k in shapes:
        for m in ms:
            cands = candidates(mode, m, tiny)
            for f in ((0.0, FRACTION) if m == 1 else (0.0,)):
                jobs.add((k, f, m, "half2", gemv_half2.pick_config(m, n, k), ()))
            for cfg, kw in cands:
                jobs.add((k, 0.0, m, "half2", cfg, tuple(sorted(kw.items()))))
    return [j[:5] + (dict(j[5]),) for j in sorted(jobs, key=repr)]


def hints(log, writer, shapes, ms, device, tiny, deadline, mode="hints"):
    """Session 3's (--hints) or 4's (--pipe) candidates (module docstring); every number also goes to the CSV."""
    from quantease.kernels import dequantize_prepared, gemv_half2

    bad = 0
    summary = []
    for m in ms:
        cands = candidates(mode, m, tiny)
        for n, k in shapes:
            if log.elapsed() > deadline:
                log("deadline reached")
                break
            lay = layouts(n, k, 0.0, device)
            ncp = n_copies(weight_bytes(lay["half2"])) if device == "cuda" else 1
            reps = copies(lay["half2"], ncp)
            wf = dequantize_prepared(lay["v1"]).double()
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = x.double() @ wf.t()
            b = min(time_fp16(n, k, m, device), time_fp16(n, k, m, device))
            dcfg = gemv_half2.pick_config(m, n, k)
            log(f"{n}x{k} M={m}: fp16 {b:.1f} us, default {cfg_name(dcfg, {})}  [{log.elapsed():.0f}s]")

            def one(cfg, kw, tag):
                nonlocal bad
                if log.elapsed() > deadline + 15:  # a shape already started may finish a little past the deadline
                    return None
                try:
                    us, err = measure(runner("half2", cfg, kw), lay["half2"], reps, x, ref, device)
                except Exception as e:
                    log(f"  {tag}{cfg_name(cfg, kw)} failed: {(str(e).strip().splitlines() or ['?'])[-1][:100]}")
                    return None
                ok = err < 3e-3
                bad += not ok
                gbs = (weight_bytes(lay["half2"]) + 2 * m * (n + k)) / us / 1e3
                writer.writerow([mode, n, k, m, 0.0, "half2", tag + cfg_name(cfg, kw), f"{us:.2f}", f"{gbs:.0f}",
                                 f"{b / us:.3f}", f"{b:.2f}", f"{err:.2e}"])
                log(f"  {tag}{cfg_name(cfg, kw):34s} {us:7.2f} us  {b / us:5.2f}x fp16  err {err:.1e}"
                    f"{'' if ok else ' WRONG'}")
                return (us, cfg, kw) if ok else None

            d = one(dcfg, {}, "default ")
            res = [r for r in (one(cfg, kw, "") for cfg, kw in cands) if r is not None]
            if d is None or not res:
                continue
            best = min(res, key=lambda r: r[0])
            o = " | "
            if m == 1:  # 0% and 0.5% outliers, default and best, back to back
                lay5 = layouts(n, k, FRACTION, device)
                reps5 = copies(lay5["half2"], ncp)
                ref5 = x.double() @ dequantize_prepared(lay5["v1"]).double().t()
                pair = []
                out0 = torch.empty(1, n, device=device, dtype=x.dtype)
                for us0, cfg, kw in (d, best):
                    t0 = timed([lambda q=q, r=runner("half2", cfg, kw): r(x, q, out0) for q in reps], device)
                    us5, err5 = measure(runner("half2", cfg, kw), lay5["half2"], reps5, x, ref5, device)
                    bad += not err5 < 3e-3
                    writer.writerow([mode + "_outliers", n, k, m, FRACTION, "half2", cfg_name(cfg, kw), f"{us5:.2f}",
                                     "", f"{b / us5:.3f}", f"{b:.2f}", f"paired_0pct={t0:.2f} err={err5:.2e}"])
                    pair.append(f"{t0:.1f} / {us5:.1f}")
                    log(f"  outliers {cfg_name(cfg, kw):28s} 0%: {t0:6.2f}  0.5%: {us5:6.2f} us (+"
                        f"{(us5 / t0 - 1) * 100:.0f}%)  err {err5:.1e}")
                o = " | ".join(pair)
                del reps5, lay5
            summary.append(f"| {n}x{k} | {m} | {b:.1f} | {cfg_name(dcfg, {})} {d[0]:.1f} ({b / d[0]:.2f}x) | "
                           f"{cfg_name(best[1], best[2])} {best[0]:.1f} ({b / best[0]:.2f}x) | {o} |")
            del reps, lay, wf
    log("\n| N x K | M | fp16 us | default us (vs fp16) | best candidate us (vs fp16) | "
        "default 0% / 0.5% outl. | best 0% / 0.5% outl. |")
    log("|---|---|---|---|---|---|---|")
    for line in summary:
        log(line)
    return bad


def focus_jobs(shapes, tiny):
    """Compile-pool jobs for --focus: explicit configs (a worker's 256-row proxy would pick another table row)."""
    from quantease.kernels import gemv, gemv_half2

    cands = TINY_FOCUS if tiny else FOCUS_M1
    fshapes = shapes if tiny else FOCUS_SHAPES
    oshapes = shapes if tiny else OUTLIER_SHAPES
    jobs = set()
    for n, k in fshapes:
        for cfg, kw in cands:
            jobs.add((k, 0.0, 1, "half2", cfg, tuple(sorted(kw.items()))))
    for n, k in shapes:
        for m in (1, 2):
            jobs.add((k, 0.0, m, "half2", gemv_half2.pick_config(m, n, k), ()))
            jobs.add((k, 0.0, m, "v1", gemv.pick_config(m), ()))
        jobs.add((k, FRACTION, 1, "half2", gemv_half2.pick_config(1, n, k), ()))
    for n, k in oshapes:
        for early in (False, True):
            jobs.add((k, FRACTION, 1, "half2", gemv_half2.pick_config(1, n, k), (("early_outliers", early),)))
    return [j[:5] + (dict(j[5]),) for j in sorted(jobs, key=repr)]


def measure(run, lay, reps, x, ref, device):
    """(us, rel err) of run on a NaN-poisoned output, then timed over the rotating copies."""
    out = torch.full((x.shape[0], lay["out_features"]), float("nan"), device=device, dtype=x.dtype)
    err = rel_err(run(x, lay, out), ref)
    us = timed([lambda q=q: run(x, q, out) for q in reps], device)
    return us, err


def focus(log, writer, shapes, device, tiny, deadline):
    """Session 2's measurements (module docstring, --focus); every number also goes to the CSV."""
    from quantease.kernels import dequantize_prepared, gemv, gemv_half2

    def row(phase, n, k, m, frac, variant, name, us, base, note, lay):
        gbs = (weight_bytes(lay) + 2 * m * (n + k)) / us / 1e3
        writer.writerow([phase, n, k, m, frac, variant, name, f"{us:.2f}", f"{gbs:.0f}",
                         f"{base / us:.3f}" if base else "", f"{base:.2f}" if base else "", note])

    fp16 = {}
    bad = 0

    def base(n, k, m):
        if (n, k, m) not in fp16:
            fp16[(n, k, m)] = [time_fp16(n, k, m, device), time_fp16(n, k, m, device)]
        return min(fp16[(n, k, m)])

    def layouts_reps(n, k, frac):
        lay = layouts(n, k, frac, device)
        ncp = n_copies(weight_bytes(lay["half2"])) if device == "cuda" else 1
        return lay, {v: copies(q, ncp) for v, q in lay.items()}

    # (a) + (b): probes and candidates on the focus shapes
    for n, k in (shapes if tiny else FOCUS_SHAPES):
        if log.elapsed() > deadline:
            log("deadline reached (candidates)")
            return bad
        lay, reps = layouts_reps(n, k, 0.0)
        wf = dequantize_prepared(lay["v1"])
        x = torch.randn(1, k, device=device, dtype=torch.float16)
        ref = (x.float() @ wf.t()).double()
        b = base(n, k, 1)
        log(f"{n}x{k} M=1 (fp16 {b:.1f} us)  [{log.elapsed():.0f}s]")
        if (n, k) == (8192, 8192) or tiny:
            for bn, bkb, warps in ((8, 16, 1), (8, 8, 1), (4, 16, 1), (2, 64, 1)) if not tiny else ((8, 2, 1),):
                calls = [probe_calls(q, bn, bkb, warps) for q in reps["half2"]]
                for i in range(2):
                    name = calls[0][i][0]
                    us = timed([c[i][1] for c in calls], device)
                    row("probe", n, k, 1, 0.0, "probe", name, us, b, "loads only", lay["half2"])
                    log(f"  probe {name:28s} {us:7.2f} us  {weight_bytes(lay['half2']) / us / 1e3:6.0f} GB/s")
        for cfg, kw in (TINY_FOCUS if tiny else FOCUS_M1):
            if log.elapsed() > deadline:
                log("deadline reached (candidates)")
                return bad
            run = runner("half2", cfg, kw)
            try:
                us, err = measure(run, lay["half2"], reps["half2"], x, ref, device)
            except Exception as e:
                log(f"  half2 {cfg_name(cfg, kw)} failed: {(str(e).strip().splitlines() or ['?'])[-1][:100]}")
                continue
            ok = err < 3e-3
            bad += not ok
            row("focus", n, k, 1, 0.0, "half2", cfg_name(cfg, kw), us, b, f"{err:.2e}", lay["half2"])
            log(f"  half2 {cfg_name(cfg, kw):24s} {us:7.2f} us  {b / us:5.2f}x fp16  err {err:.1e}"
                f"{'' if ok else ' WRONG'}")
        del reps, lay, wf

    # (c): outlier slots before / after the K loop, 0.5%, paired with 0% (same config, back to back)
    for n, k in (shapes if tiny else OUTLIER_SHAPES):
        if log.elapsed() > deadline:
            log("deadline reached (outliers)")
            return bad
        lay0, reps0 = layouts_reps(n, k, 0.0)
        lay5, reps5 = layouts_reps(n, k, FRACTION)
        wf = dequantize_prepared(lay5["v1"])
        x = torch.randn(1, k, device=device, dtype=torch.float16)
        ref = (x.float() @ wf.t()).double()
        cfg = gemv_half2.pick_config(1, n, k)
        out0 = torch.empty(1, n, device=device, dtype=x.dtype)
        t0 = timed([lambda q=q: runner("half2", cfg, {})(x, q, out0) for q in reps0["half2"]], device)
        res = []
        for early in (False, True):
            us, err = measure(runner("half2", cfg, {"early_outliers": early}), lay5["half2"], reps5["half2"], x, ref,
                              device)
            bad += not err < 3e-3
            res.append((us, err))
            row("outliers", n, k, 1, FRACTION, "half2", cfg_name(cfg, {"early_outliers": early}), us, base(n, k, 1),
                f"paired_0pct={t0:.2f} err={err:.2e}", lay5["half2"])
        log(f"  {n}x{k} {cfg_name(cfg, {}):12s} 0%: {t0:6.2f} us  0.5% after loop: {res[0][0]:6.2f} "
            f"(+{(res[0][0] / t0 - 1) * 100:.0f}%)  before loop: {res[1][0]:6.2f} (+{(res[1][0] / t0 - 1) * 100:.0f}%)"
            f"  errs {res[0][1]:.1e} / {res[1][1]:.1e}")
        del reps0, reps5, lay0, lay5, wf

    # (d): the default table vs v1's default vs fp16, every shape, M = 1, 2 (+0.5% outliers at M = 1)
    log("\n| N x K | M | half2 config | half2 us | vs fp16 | v1 us | fp16 us | half2 0.5% outl. us |")
    log("|---|---|---|---|---|---|---|---|")
    for n, k in shapes:
        if log.elapsed() > deadline:
            log("deadline reached (table)")
            return bad
        lay, reps = layouts_reps(n, k, 0.0)
        wf = dequantize_prepared(lay["v1"])
        for m in (1, 2):
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = (x.float() @ wf.t()).double()
            cfg = gemv_half2.pick_config(m, n, k)
            h_us, h_err = measure(runner("half2", None, {}), lay["half2"], reps["half2"], x, ref, device)
            v_us, v_err = measure(runner("v1", None, {}), lay["v1"], reps["v1"], x, ref, device)
            bad += not (h_err < 3e-3 and v_err < 3e-3)
            b = base(n, k, m)
            row("table", n, k, m, 0.0, "half2", cfg_name(cfg, {}), h_us, b, f"{h_err:.2e}", lay["half2"])
            row("table", n, k, m, 0.0, "v1", cfg_name(gemv.pick_config(m), {}), v_us, b, f"{v_err:.2e}", lay["v1"])
            o = ""
            if m == 1:
                lay5, reps5 = layouts_reps(n, k, FRACTION)
                ref5 = (x.float() @ dequantize_prepared(lay5["v1"]).t()).double()
                o_us, o_err = measure(runner("half2", None, {}), lay5["half2"], reps5["half2"], x, ref5, device)
                bad += not o_err < 3e-3
                row("table", n, k, m, FRACTION, "half2", cfg_name(cfg, {}), o_us, b, f"{o_err:.2e}", lay5["half2"])
                o = f"{o_us:.1f} (+{(o_us / h_us - 1) * 100:.0f}%)"
                del reps5, lay5
            log(f"| {n}x{k} | {m} | {cfg_name(cfg, {})} | {h_us:.1f} | {b / h_us:.2f}x | {v_us:.1f} | {b:.1f} | {o} |")
        del reps, lay, wf
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--deadline", type=float, default=450, help="seconds; stop starting new work after this")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: CPUs - 2, max 14)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, 2 configs per variant (CPU dry run)")
    ap.add_argument("--shapes", default=None, help="e.g. 8192x8192,28672x8192 (default: all nine)")
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--focus", action="store_true", help="session 2's probes / candidates / outliers / table")
    ap.add_argument("--hints", action="store_true", help="session 3's pinned loads / cache hints candidates")
    ap.add_argument("--pipe", action="store_true", help="session 4's cp.async-pipelined K loop candidates")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gemv_sweep.log"))
    device = _DEVICE
    tiny = args.tiny or device == "cpu"
    shapes = TINY_SHAPES if tiny else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    ms = tuple(int(v) for v in args.ms.split(","))
    log(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (TRITON_INTERPRET dry run)'}, torch "
        f"{torch.__version__}, triton {triton.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log("configs per (variant, M): " + ", ".join(f"{v} M={m}: {len(configs(v, m, tiny))}"
                                                  for m in ms for v in ("v1", "half2")))
    torch.manual_seed(0)

    # 1. compile pool (GPU: one process per core; CPU dry run: as asked) + the float64 check meanwhile
    # one job per compiled kernel: K (not N) and the M bucket (BM = 1, 2, 4) decide it
    jobs = sorted({(k, f, min(m, 4), v, cfg, tuple(sorted(kw.items())))
                   for k in sorted({k for _, k in shapes}) for m in ms
                   for f in ((0.0, FRACTION) if m == ms[0] else (0.0,))
                   for v in ("half2", "v1") for cfg, kw in configs(v, m, tiny)}, key=repr)
    jobs = [j[:5] + (dict(j[5]),) for j in jobs]  # sorted by K: a worker keeps one K's proxy weights at a time
    if args.focus:
        jobs = focus_jobs(shapes, tiny)
    mode = "pipe" if args.pipe else ("hints" if args.hints else None)
    if mode:
        jobs = hint_jobs(shapes, ms, tiny, mode)
    workers = args.workers if args.workers is not None else (max(1, min(14, (os.cpu_count() or 4) - 2))
                                                            if device == "cuda" else 0)
    pool = res = None
    if workers:
        log(f"compile: {len(jobs)} jobs on {workers} processes")
        pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
        res = pool.imap_unordered(_worker_job, jobs)  # chunksize 1: next(timeout) works
    bad = check_reference(log, shapes, device, args.deadline * 0.3)
    if pool is not None:
        failed = {}
        try:
            for i in range(len(jobs)):
                try:
                    job, err = res.next(timeout=max(0.1, args.deadline * 0.45 - log.elapsed()))
                except mp.TimeoutError:
                    log(f"compile: time share used up after {i}/{len(jobs)} jobs, the rest compiles on first use")
                    break
                if err:
                    failed.setdefault((job[3], cfg_name(job[4], job[5]), job[2]), f"K={job[0]}: {err}")
                if i % 100 == 0:
                    log(f"  compiled {i}/{len(jobs)} [{log.elapsed():.0f}s]")
        finally:
            pool.terminate()
            pool.join()
        for (v, name, m), err in sorted(failed.items()):
            log(f"  compile failed: {v} {name} M={m}: {err}")
        log(f"compile: done [{log.elapsed():.0f}s]")

    if mode:
        with open(os.path.join(args.out, "gemv_sweep.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["phase", "n", "k", "m", "fraction", "variant", "config", "us", "gbs", "speedup_vs_fp16",
                             "fp16_us", "rel_err_or_note"])
            bad += hints(log, writer, shapes, ms, device, tiny, args.deadline, mode)
        log(f"done [{log.elapsed():.0f}s]; check {'passed' if bad == 0 else 'FAILED'}")
        return 1 if bad else 0

    if args.focus:
        with open(os.path.join(args.out, "gemv_sweep.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["phase", "n", "k", "m", "fraction", "variant", "config", "us", "gbs", "speedup_vs_fp16",
                             "fp16_us", "rel_err_or_note"])
            bad += focus(log, writer, shapes, device, tiny, args.deadline)
        log(f"done [{log.elapsed():.0f}s]; check {'passed' if bad == 0 else 'FAILED'}")
        return 1 if bad else 0

    # 2./3. timing: M = 1 on every shape first, then the larger M
    fp16 = {}
    best = {}
    with open(os.path.join(args.out, "gemv_sweep.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["phase", "n", "k", "m", "fraction", "variant", "config", "us", "gbs", "speedup_vs_fp16",
                         "fp16_us", "rel_err_or_note"])
        stop = False
        for phase_ms, outl in ((ms[:1], True), (ms[1:], False)):
            for n, k in shapes:
                if stop or not phase_ms:
                    break
                log(f"sweep {n}x{k} M={','.join(map(str, phase_ms))} [{log.elapsed():.0f}s]")
                r, stop = sweep_shape(log, writer, n, k, phase_ms, device, tiny, args.deadline, fp16, outl)
                f.flush()
                for key, v in r.items():
                    best[(n, k) + key] = v

    # summary
    log(f"\n| N x K | M | variant | best config | us | GB/s | vs fp16 | 0.5% outl. us (paired 0%) | 2nd config us |")
    log("|---|---|---|---|---|---|---|---|---|")
    for n, k in shapes:
        for m in ms:
            if (n, k, m) not in fp16:
                continue
            base = min(fp16[(n, k, m)])
            for variant in ("half2", "v1"):
                r = sorted(best.get((n, k, m, variant), []), key=lambda t: t[0])
                if not r:
                    continue
                us, cfg, kw = r[0]
                lay_bytes = 3 * n * k / 8 + 2 * n + 2 * m * (n + k)
                o = [t for t in best.get((n, k, "outl", m, variant), []) if t[2] == cfg and t[3] == kw]
                ostr = f"{o[0][1]:.1f} ({o[0][0]:.1f}, +{(o[0][1] / o[0][0] - 1) * 100:.0f}%)" if o else ""
                log(f"| {n}x{k} | {m} | {variant} | {cfg_name(cfg, kw)} | {us:.1f} | {lay_bytes / us / 1e3:.0f} | "
                    f"{base / us:.2f}x (fp16 {base:.1f}) | {ostr} | {r[1][0] if len(r) > 1 else float('nan'):.1f} |")
    log(f"done [{log.elapsed():.0f}s]; check {'passed' if bad == 0 else 'FAILED'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
