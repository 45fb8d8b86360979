"""Cross-layer L2 prefetch (XPF): a decode kernel's last act is to start pulling the NEXT layers' weights into L2.

Why.  At small batch a decoder step is a chain of weight-streaming GEMVs with small kernels between them (norms,
activation, rope, attention) and launch gaps, during which DRAM sits nearly idle: in vLLM run 7 (H100, Llama-3-8B
shape, batch 1) ~1.0 ms of the 3.35 ms step was not our GEMVs.  Weights depend on no activation, so the words of
the layer that runs next can be requested as soon as this kernel's own loads are done; the norm / attention that
follows then runs while DRAM fills L2, and the next GEMV reads part of its words from L2.  (The same idea as
vllm-ascend's weight prefetch during RMSNorm / SwiGLU.)

How.
  links    learned at run time, once: the first time a layer runs (ops._forward, Triton path), the quantized layer
           that ran just before it gets it as its successor (`visit`).  So any model, in execution order, in vLLM
           and transformers alike; a layer seen before (the next step's first layer) is never a successor, and a
           link never changes.  Links are attributes of the layers' anchor tensors holding weak references: they
           die with the weights and keep nothing alive.  Set the variable before the first forward (vLLM: before
           the server starts): links form during the first forward and CUDA-graph capture bakes them in.
  regions  (`launch_args`) the next layers' outlier tables and words (or bit planes), in chain order, up to a byte
           cap: at most MAX_REGIONS (address, bytes) pairs, passed to the kernel as scalars.
  tail     (`tail`, @triton.jit, called after the kernel's stores) the last programs of the grid (one per SM;
           `:all`: every program) prefetch a share of each region: `cp.async.bulk.prefetch.L2` per warp over a
           16-byte-aligned slice (mode BULK: the TMA unit issues the lines, the warp does not wait), or
           `prefetch.global.L2` per 128-byte line (mode LINES).  A hint only: results are bitwise the same with it
           on or off.  The slicing (`issuer`, `bulk_slice`, `line_slice`) is plain Triton, tested under the
           interpreter; only the two asm statements need the GPU.

$QUANTEASE_XPREFETCH: 0 (off, the default until the device has timed it), or N[:lines][:all]: N MiB of the
following layers per kernel, bulk (or per-line) prefetch, issued by the grid's last programs (or all of them).
CUDA only; the half2 kernels (gemv_half2, gemm_half2) issue it, the other paths only take part in the links.
benchmarks/xprefetch.py times a synthetic Llama-3-8B decode step with it off and on.
"""
import functools
import os
import weakref

import torch
import triton
import triton.language as tl

from quantease.errors import QuantEaseError

ENV = "QUANTEASE_XPREFETCH"
BULK, LINES = 1, 2  # the kernels' XPF constexpr (0: off)
MAX_REGIONS = 4
SOURCES = ("outlier_idx", "outlier_val", "words", "plane0", "plane1")  # what the next layer reads, tables first
_NEXT, _SEEN, _CACHE = "_quantease_xpf_next", "_quantease_xpf_seen", "_quantease_xpf_regions"
_last = None  # weak reference to the anchor of the layer that ran last
_version = 0  # bumped whenever a link forms: cached regions computed before it are stale


def setting():
    """(mode, cap in bytes, every program issues) from $QUANTEASE_XPREFETCH; mode 0 when off."""
    return _parse((os.environ.get(ENV, "0") or "0").strip())


@functools.lru_cache(maxsize=16)
def _parse(raw):
    """setting()'s parse, once per value: every Triton call reads the setting twice (the links in ops._forward, the
    launch arguments in the kernel's wrapper)."""
    size, *flags = raw.split(":")
    try:
        mib = float(size)
    except ValueError:
        mib = -1
    if not 0 <= mib <= 1024 or not set(flags) <= {"bulk", "lines", "all"} or {"bulk", "lines"} <= set(flags):
        raise QuantEaseError(f"${ENV}={raw!r}: 0 (off) or N[:lines][:all] -- N (0 < N <= 1024) MiB of the next "
                             f"layers prefetched into L2 per kernel, lines: per 128-byte line instead of bulk, all: "
                             f"by every program instead of the last one per SM")
    if mib == 0:
        return 0, 0, False
    return (LINES if "lines" in flags else BULK), int(mib * 2**20), "all" in flags


@functools.lru_cache(maxsize=None)
def _sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _anchor(p):
    t = p.get("words")
    return t if t is not None else p.get("plane0")


def visit(p):
    """Record that the layer of prepared dict p runs now: on its first run it becomes the successor of the layer
    that ran before it (if that one has none yet)."""
    global _last, _version
    a = _anchor(p)
    if a is None:
        return
    if not getattr(a, _SEEN, False):
        setattr(a, _SEEN, True)
        prev = _last() if _last is not None else None
        if prev is not None and prev is not a and getattr(prev, _NEXT, None) is None:
            setattr(prev, _NEXT, {name: weakref.ref(p[name]) for name in SOURCES if p.get(name) is not None})
            _version += 1
    _last = weakref.ref(a)


def successor(p):
    """The linked next layer's tensors {name: tensor} (those still alive), or None."""
    a = _anchor(p)
    refs = getattr(a, _NEXT, None) if a is not None else None
    if refs is None:
        return None
    alive = {name: r() for name, r in refs.items()}
    return {name: t for name, t in alive.items() if t is not None} or None


def regions(p, cap, device):
    """[(address, bytes)] of the following layers' tensors in chain order, up to cap bytes in all and MAX_REGIONS
    regions; 16-byte aligned starts, sizes rounded down to 16 bytes (cp.async.bulk's rule)."""
    out, left, seen = [], cap, set()
    nxt = successor(p)
    while nxt is not None and left >= 16 and len(out) < MAX_REGIONS:
        key = id(_anchor(nxt))
        if key in seen:  # a cycle (two models taking turns): stop
            break
        seen.add(key)
        for name in SOURCES:
            t = nxt.get(name)
            if t is None or t.device != device or not t.is_contiguous() or t.data_ptr() % 16:
                continue
            size = min(t.numel() * t.element_size(), left) // 16 * 16
            if size > 0 and len(out) < MAX_REGIONS:
                out.append((t.data_ptr(), size))
                left -= size
        nxt = successor(nxt)
    return out


def launch_args(p, x, warps):
    """The kernel arguments of the tail for a launch reading x: XPF (mode, 0 off), XPF_N regions, XPF_LANES
    threads, xlast (programs that issue: the last xlast of the grid, 0 all of them), and the regions as xa0, xn0 ..
    xa3, xn3 (zeros past XPF_N).  Regions cached on the layer per setting."""
    mode, cap, every = setting() if x.is_cuda else (0, 0, False)
    regs = []
    a = _anchor(p)
    if mode and a is not None:
        key = (cap, _version, x.device)
        hit = getattr(a, _CACHE, None)
        if hit is not None and hit[0] == key:
            regs = hit[1]
        else:
            regs = regions(p, cap, x.device)
            setattr(a, _CACHE, (key, regs))
    index = x.device.index if x.device.index is not None else (torch.cuda.current_device() if x.is_cuda else 0)
    last = 0 if every or not regs else _sms(index)
    args = dict(XPF=mode if regs else 0, XPF_N=len(regs), XPF_LANES=32 * warps, xlast=last)
    for i in range(MAX_REGIONS):
        addr, size = regs[i] if i < len(regs) else (0, 0)
        args[f"xa{i}"], args[f"xn{i}"] = addr, size
    return args


@triton.jit
def issuer(pid, nprog, xlast):
    """(rel, issuers): this program's index among the grid's issuing programs -- the last xlast (0: all) in launch
    order -- negative when it does not issue, and how many issue."""
    issuers = tl.where(xlast > 0, tl.minimum(nprog, xlast), nprog)
    return pid - (nprog - issuers), issuers


@triton.jit
def bulk_slice(addr, nbytes, rel, issuers, LANES: tl.constexpr):
    """Mode BULK: (start, bytes, per-warp bytes) of issuer rel's share of [addr, addr + nbytes); warp w prefetches
    [start + w * per_warp, + min(per_warp, bytes - w * per_warp)) where that is > 0 (the asm in _region).  All
    multiples of 16; bytes 0 for rel < 0 (branch-free: an if around the tail cost gemm_half2's (16, 128, 4) 52
    registers, sm_90 AOT)."""
    share = tl.cdiv(tl.cdiv(nbytes, issuers), 16 * LANES) * (16 * LANES)
    size = tl.where(rel >= 0, tl.minimum(tl.maximum(nbytes - rel * share, 0), share), 0)
    return addr + (rel * share).to(tl.int64), size, share // (LANES // 32)


@triton.jit
def line_slice(addr, nbytes, rel, issuers, LANES: tl.constexpr):
    """Mode LINES: (start [LANES], bytes [LANES], piece) of each thread's piece of issuer rel's share; the thread
    prefetches the 128-byte lines at start + 128 j for 128 j < bytes (j < cdiv(piece, 128)); bytes 0 for rel < 0."""
    share = tl.cdiv(tl.cdiv(nbytes, issuers), 16 * LANES) * (16 * LANES)
    piece = share // LANES
    start = rel * share + tl.arange(0, LANES) * piece
    size = tl.where(rel >= 0, tl.minimum(tl.maximum(nbytes - start, 0), piece), 0)
    return addr + start.to(tl.int64), size, piece


@triton.jit
def _region(addr, nbytes, rel, issuers, MODE: tl.constexpr, LANES: tl.constexpr):
    """Issuer rel's share of [addr, addr + nbytes) into L2 (rel < 0: nothing)."""
    if MODE == 1:
        # cp.async.bulk.prefetch is a warp-uniform instruction (UBLKPF): one per warp, over the warp's slice of the
        # program's share (every thread holds the same operands, so ptxas emits it once per warp, no loop)
        start, size, warp = bulk_slice(addr, nbytes, rel, issuers, LANES)
        one = tl.full([1], 0, tl.int32)
        tl.inline_asm_elementwise(
            "{\n\t.reg .u32 w;\n\t.reg .s32 r;\n\t.reg .u64 a;\n\t.reg .pred p;\n\t"
            "mov.u32 w, %tid.x;\n\tshr.u32 w, w, 5;\n\tmul.lo.s32 r, w, $3;\n\t"
            "cvt.u64.u32 a, r;\n\tadd.u64 a, a, $1;\n\tsub.s32 r, $2, r;\n\tmin.s32 r, r, $3;\n\t"
            "setp.gt.s32 p, r, 0;\n\t@p cp.async.bulk.prefetch.L2.global [a], r;\n\tmov.b32 $0, 0;\n\t}",
            "=r,l,r,r", [start + one.to(tl.int64), size + one, warp + one], dtype=tl.int32, is_pure=False, pack=1)
    else:  # one prefetch.global.L2 per 128-byte line of each thread's piece (sm_80 too)
        at, size, piece = line_slice(addr, nbytes, rel, issuers, LANES)
        for j in range(0, tl.cdiv(piece, 128)):
            on = (j * 128 < size).to(tl.int32)
            tl.inline_asm_elementwise(
                "{\n\t.reg .pred p;\n\tsetp.ne.s32 p, $2, 0;\n\t@p prefetch.global.L2 [$1];\n\tmov.b32 $0, 0;\n\t}",
                "=r,l,r", [at + j * 128, on], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def tail(pid, nprog, xlast, xa0, xn0, xa1, xn1, xa2, xn2, xa3, xn3,
         XPF: tl.constexpr, XPF_N: tl.constexpr, XPF_LANES: tl.constexpr):
    """After the kernel's stores: a share of the next layers' regions into L2 (XPF 0: nothing).  Only the last
    xlast programs issue (0: all): the grid runs in waves in launch order, and a prefetch issued by an early wave
    would only compete with this kernel's own stream -- the point is DRAM work left over for the kernels after it."""
    if XPF > 0:
        rel, issuers = issuer(pid, nprog, xlast)
        if XPF_N > 0:
            _region(xa0, xn0, rel, issuers, XPF, XPF_LANES)
        if XPF_N > 1:
            _region(xa1, xn1, rel, issuers, XPF, XPF_LANES)
        if XPF_N > 2:
            _region(xa2, xn2, rel, issuers, XPF, XPF_LANES)
        if XPF_N > 3:
            _region(xa3, xn3, rel, issuers, XPF, XPF_LANES)
