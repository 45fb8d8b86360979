"""sm_90 SASS of the GEMM kernels, compiled here without a GPU: for refactors that must not change the machine code.

    pip install --target /tmp/t36 --no-deps triton==3.6.0          # the device's Triton (once)
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/sass.py /tmp/sass/after
    git stash; PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/sass.py /tmp/sass/before; git stash pop
    for f in /tmp/sass/before/*.sass; do cmp -s $f /tmp/sass/after/${f##*/} || echo ${f##*/}; done

Compiles gemm.qgemm_kernel and gemm_swap.qgemm_swap_kernel (triton.compile of an ASTSource for GPUTarget cuda 90)
over the constexpr sets below (3-bit asym / sym / groups of blocks / per-element groups, 4-bit; the swap GEMM's
register-A and 16-bit-A paths, outliers fused), writes each SASS (cuobjdump -sass, instruction text only) to
OUTDIR/<variant>.sass and prints its instruction count and hash.  The same source compiles to the same SASS
(checked twice, 2026-12-02).

    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/sass.py --half2 /tmp/sass/half2

compiles the half2 kernels instead (gemm_half2.qgemm_half2_kernel, gemv_half2.qgemv_half2_kernel; asymmetric per
channel): with and without outliers and groups, and with the outlier slots inside the K loop (IL / ILR, session 12)."""
import hashlib
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from quantease.kernels import gemm, gemm_half2, gemm_swap, gemv_half2

PTR = dict(x_ptr="*fp16", xt_ptr="*fp16", y_ptr="*fp16", p0_ptr="*i32", p1_ptr="*i32", s_ptr="*fp16", z_ptr="*u8",
           b_ptr="*fp16", oi_ptr="*i16", ov_ptr="*fp16", hsh_ptr="*i32",
           **{f"xa{i}": "i64" for i in range(4)})  # xprefetch's region addresses (sizes: i32)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


def disassemble(cubin):
    """(SASS text, "REG:n STACK:n") of a compiled kernel's cubin, by the cuobjdump triton ships (ws_probe.py --aot
    too)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    return sass, " ".join(w for w in res.split() if w.startswith(("REG:", "STACK:")))


def build(fn, consts, warps, stages, tag, ptrs=None):
    """ptrs: pointer types that differ from PTR's for this kernel."""
    types = dict(PTR, **(ptrs or {}))
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    # 16-divisible pointers, strides and K, as the launches give them (the swap GEMM's x^T strides may be 1)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if (a.endswith("_ptr") or a.startswith("stride_") or a == "K") and a not in ("stride_xt", "stride_xtm")}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    sass, usage = disassemble(k.asm["cubin"])
    # drop addresses/encodings: keep the instruction text
    lines = [l.split("*/", 1)[1].strip() if "*/" in l else l.strip() for l in sass.splitlines() if "/*" in l]
    text = "\n".join(lines)
    open(os.path.join(out, tag + ".sass"), "w").write(text)
    smem = sum(text.count(op) for op in ("LDS", "STS"))  # shared-memory loads/stores (LDSM, STSM too)
    print(tag, len(lines), hashlib.sha256(text.encode()).hexdigest()[:12], usage, f"LDS/STS:{smem}", flush=True)


def planes():
    """The GEMMs on the bit planes."""
    base = dict(W0=2, ZERO=4, INPLACE=True, ASM=True, IEEE=False)
    # WPF / ZLOAD (session 5) off: the same SASS as before they existed; a checkout without them compiles without
    NEW_FLAGS_OFF = dict(WPF=False, ZLOAD=False) if "WPF" in gemm_swap.qgemm_swap_kernel.arg_names else {}
    for bits, zeros, mode in ((3, True, 0), (3, True, 1), (3, False, 0), (4, True, 0), (3, True, 2)):
        c = dict(base, BITS=bits, W0=2 if bits == 3 else bits, ZERO=2 ** (bits - 1), HAS_ZEROS=zeros, GROUP_MODE=mode,
                 HAS_BIAS=False, INPLACE=bits == 3 and mode != 2)
        build(gemm.qgemm_kernel, dict(c, BM=64, BN=128, GROUP_M=8), 8, 3, f"gemm_b{bits}_z{int(zeros)}_g{mode}")
        for rega, xpf, outl in ((True, 4, 0), (False, 0, 1), (True, 2, 1)):
            if rega and mode == 2:
                continue
            sc = dict(c, OUTLIERS=outl, REGA=rega, SPLIT=True, ATOMIC=True, BM=16, BN=128, BR=2, XPF=xpf, XBK=256,
                      PIPE=None, **NEW_FLAGS_OFF)
            build(gemm_swap.qgemm_swap_kernel, sc, 4, 1 if rega else 2,
                  f"swap_b{bits}_z{int(zeros)}_g{mode}_r{int(rega)}_x{xpf}_o{outl}")
    if NEW_FLAGS_OFF:  # the 1-warp mma.sync configs (16-bit A): asymmetric without and with the words loaded a block
        # ahead; symmetric with the zero as a constant and as the wrapper's uint8 load (ZLOAD: the LDS/STS count)
        c = dict(base, BITS=3, HAS_ZEROS=True, GROUP_MODE=0, HAS_BIAS=False, OUTLIERS=1, REGA=False, SPLIT=True,
                 ATOMIC=True, BM=16, BR=1, XPF=0, XBK=256, PIPE=None, ZLOAD=False)
        for bn in (16, 32):
            for wpf in (False, True):
                build(gemm_swap.qgemm_swap_kernel, dict(c, BN=bn, WPF=wpf), 1, 1, f"mma2_bn{bn}_wpf{int(wpf)}")
            for zload in (False, True):
                build(gemm_swap.qgemm_swap_kernel, dict(c, BN=bn, WPF=False, HAS_ZEROS=False, ZLOAD=zload), 1, 1,
                      f"mma2_bn{bn}_sym_zload{int(zload)}")
        for zload in (False, True):  # symmetric groups of whole blocks (block_grid's zero)
            build(gemm_swap.qgemm_swap_kernel, dict(c, BN=16, WPF=False, HAS_ZEROS=False, GROUP_MODE=1, ZLOAD=zload),
                  1, 1, f"mma2_bn16_sym_g1_zload{int(zload)}")


XPF = "XPF" in gemm_half2.qgemm_half2_kernel.arg_names  # a checkout before the prefetch tail compiles without it


def xpf_off(warps):
    return dict(XPF=0, XPF_N=0, XPF_LANES=32 * warps) if XPF else {}


def half2():
    """gemm_half2 (1-warp mma.sync and 4-warp wgmma tiles, PIPE 2) without / with 0.5%-style outliers and groups, and
    IL at BR 1 and the table's BR, OF 4 (4 blocks prefetched; with outliers, their steps before the loop); the
    GEMV's M = 1 configs at Q = 8 ((8, 8, 1): 8192^2, (32, 2, 1): long N) without outliers, with the early slots,
    after the loop, and 8 slots a step inside it (ILR); and the cross-layer L2 prefetch tail (XPF bulk / lines)."""
    ptrs = dict(w_ptr="*i16", z_ptr="*i16")
    for bm, bn, warps in ((16, 64, 1), (16, 128, 4), (32, 128, 4)):
        br = gemm_swap.epilogue_br(warps, bm, bn)
        variants = ((False, False, False, br, 0), (True, False, False, br, 0), (True, True, False, br, 0),
                    (True, False, False, 1, 0), (True, False, True, br, 0), (True, False, True, 1, 0),
                    (False, False, False, br, 4), (True, False, False, br, 4))
        for outl, grouped, il, r, of in dict.fromkeys(variants):  # (BR 1 rows once where the table's BR is 1)
            c = dict(BF16=False, ZERO=4, HAS_ZEROS=True, GROUPED=grouped, HAS_BIAS=False, OUTLIERS=outl, ASM=True,
                     SPLIT=True, ATOMIC=True, BM=bm, BN=bn, BR=r, PIPE=2, OS=0, PRE=0, IL=il, OF=bool(of and outl),
                     PDL=0, PF=of, **xpf_off(warps))
            tag = f"half2_{bm}_{bn}_{warps}_o{int(outl)}_g{int(grouped)}_il{int(il)}_br{r}"
            build(gemm_half2.qgemm_half2_kernel, c, warps, 1, tag + (f"_of{of}" if of else ""), ptrs)
        if XPF:  # the cross-layer L2 prefetch tail (kernels/xprefetch.py), bulk and per line, 3 regions
            for mode in (1, 2):
                c.update(OUTLIERS=True, GROUPED=False, IL=False, OF=False, PF=0, BR=br, XPF=mode, XPF_N=3)
                build(gemm_half2.qgemm_half2_kernel, c, warps, 1, f"half2_{bm}_{bn}_{warps}_o1_xpf{mode}", ptrs)
    ptrs = dict(w_ptr="*i32", z_ptr="*i16")
    for bn, bkb in ((8, 8), (32, 2)):
        for outl, early, ilr in ((False, False, 0), (True, True, 0), (True, False, 0), (True, False, 8)):
            c = dict(BF16=False, ZERO=4, HAS_ZEROS=True, PER_CHANNEL=True, HAS_OUTLIERS=outl, HAS_BIAS=False,
                     ASM=True, PREFETCH=1, EARLY=early, LEAD=0, LEVEL=2, LINES=8, PIN=False, CG=False, XHINT=False,
                     XL=8, PIPE=1, PDL=0, Q=8, GB=1, BM=1, BN=bn, BKB=bkb, BR=32, ILR=ilr, **xpf_off(1))
            build(gemv_half2.qgemv_half2_kernel, c, 1, 3, f"gemv_{bn}_{bkb}_o{int(outl)}_e{int(early)}_ilr{ilr}", ptrs)
        if XPF:
            for mode in (1, 2):
                c.update(XPF=mode, XPF_N=3)
                build(gemv_half2.qgemv_half2_kernel, c, 1, 3, f"gemv_{bn}_{bkb}_o1_ilr8_xpf{mode}", ptrs)


if __name__ == "__main__":
    out = [a for a in sys.argv[1:] if a != "--half2"][0]
    os.makedirs(out, exist_ok=True)
    half2() if "--half2" in sys.argv else planes()
