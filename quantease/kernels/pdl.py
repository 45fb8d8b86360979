"""Programmatic dependent launch (PDL, sm_90+) for the decode kernels.

A kernel launched with PDL may start while the kernel before it on the stream is still running: its programs become
resident as soon as the one before has triggered (gdc_launch_dependents, or implicitly as its programs exit), and
they stall at gdc_wait() until that kernel has finished and its writes are visible.  A decode GEMV reads mostly
weights, which no earlier kernel writes, so it loads its first weight tiles before the wait: the DRAM ramp of one
kernel overlaps the tail of the one before instead of following it (inside a CUDA graph too).

The rule every PDL kernel here keeps: before gdc_wait() it reads only the layer's own tensors (words, scales,
zeros, outlier tables) and writes nothing; x, out and everything else come after it.  gdc_wait() is a no-op
when the kernel was launched without PDL, so one compiled kernel serves both.

Off unless QUANTEASE_PDL is 1 or late (sm_90 and newer only; the CPU interpreter never uses it).  1 (EARLY) lets
the next kernel launch from this one's top, late (LATE) only after this one's K loop, so that the next kernel's
programs overlap only the epilogue and store instead of contending with the whole loop (H100, session 10: EARLY
slower on 20 of 24 benchmark rows, benchmarks/results/kernels_h100.md).  Both wait on their GPU timing
(benchmarks/kernels.py --bench --pdl-ab MODE) before either becomes the default.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from quantease.errors import QuantEaseError

ENV = "QUANTEASE_PDL"
DEFAULT = "0"
EARLY, LATE = 1, 2  # the kernels' PDL constexpr: where the next kernel may launch (0: launched without PDL)
MODES = {"0": 0, "1": EARLY, "late": LATE}


@functools.lru_cache(maxsize=None)
def _capable(index):
    gdc = getattr(tl.extra.cuda, "gdc_wait", None) is not None  # triton >= 3.3
    return gdc and torch.cuda.get_device_capability(index)[0] >= 9


def enabled(x, want=None):
    """The PDL mode (0, EARLY or LATE) for a kernel reading x: want (a caller's explicit choice: a mode, True for
    EARLY; CUDA only), or when None $QUANTEASE_PDL on sm_90+."""
    if want is not None:
        return int(want) if x.is_cuda else 0
    flag = os.environ.get(ENV, DEFAULT) or DEFAULT
    if flag not in MODES:
        raise QuantEaseError(f"${ENV}={flag!r}: 0 (off), 1 (on, the next kernel launches from the top) or late "
                             f"(on, from after the K loop); sm_90 and newer; default {DEFAULT}")
    capable = x.is_cuda and _capable(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return MODES[flag] if capable else 0


def launch_kwargs(on):
    """The launch option for a kernel whose PDL constexpr is `on`."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def start(PDL: tl.constexpr):
    """At the kernel's top: let the next kernel on the stream launch (mode EARLY; its programs fill the SMs' free
    slots and stall at their wait)."""
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def start_late(PDL: tl.constexpr):
    """After the K loop: the same for mode LATE."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the kernel before this one has finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()
