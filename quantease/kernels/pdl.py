"""Programmatic dependent launch (PDL, sm_90+) for the decode kernels.

A kernel launched with PDL may start while the kernel before it on the stream is still running: its programs become
resident as soon as the one before has triggered (gdc_launch_dependents, or implicitly as its programs exit), and
they stall at gdc_wait() until that kernel has finished and its writes are visible.  A decode GEMV reads mostly
weights, which no earlier kernel writes, so it loads its first weight tiles before the wait: the DRAM ramp of one
kernel overlaps the tail of the one before instead of following it (inside a CUDA graph too).

The rule every PDL kernel here keeps: before gdc_wait() it reads only the layer's own tensors (words, scales,
zeros, outlier tables) and writes nothing; x, out and everything else come after it.  gdc_wait() is a no-op
when the kernel was launched without PDL, so one compiled kernel serves both.

Off unless QUANTEASE_PDL=1 (sm_90 and newer only; the CPU interpreter never uses it): it waits on its GPU
timing (benchmarks/kernels.py --bench --pdl-ab) before it becomes the default.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from quantease.errors import QuantEaseError

ENV = "QUANTEASE_PDL"
DEFAULT = "0"


@functools.lru_cache(maxsize=None)
def _capable(index):
    gdc = getattr(tl.extra.cuda, "gdc_wait", None) is not None  # triton >= 3.3
    return gdc and torch.cuda.get_device_capability(index)[0] >= 9


def enabled(x, want=None):
    """True when a kernel reading x should be launched with PDL: want (a caller's explicit choice, CUDA only), or
    when None $QUANTEASE_PDL=1 on sm_90+."""
    if want is not None:
        return bool(want) and x.is_cuda
    flag = os.environ.get(ENV, DEFAULT) or DEFAULT
    if flag not in ("0", "1"):
        raise QuantEaseError(f"${ENV}={flag!r}: 0 (off) or 1 (on, sm_90 and newer; default {DEFAULT})")
    return flag == "1" and x.is_cuda and _capable(x.device.index if x.device.index is not None else
                                                  torch.cuda.current_device())


def launch_kwargs(on):
    """The launch option for a kernel whose PDL constexpr is `on`."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def start(PDL: tl.constexpr):
    """Let the next kernel on the stream launch (its programs fill the SMs' free slots and stall at their wait)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the kernel before this one has finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()
