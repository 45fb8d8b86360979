"""Triton form of one QuantEase sweep on CUDA (same arithmetic as cd.sweep_torch).

The torch sweep launches ~10 small kernels per column, so on a GPU it is launch-bound.  Here one
launch does a whole block of B columns: each program owns BM rows (rows are independent in CD), keeps
its [BM, B] slice of R in registers, and walks the B columns in order, updating that slice with the
B x B diagonal block of Sigma.  After each block one GEMM brings the rest of R up to date.
"""
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack triton: cd.sweep falls back to torch
    triton = None

BM = 16       # rows per program
BLOCK = 128   # columns per block (one launch)


def available():
    return triton is not None and torch.cuda.is_available() and os.environ.get("QUANTEASE_NO_TRITON") != "1"


_broken = []  # the first failure of a Triton form here: torch from then on


def run(kernel, fallback, *args):
    """kernel(*args) when args[0] is on CUDA and the Triton forms work here, else fallback(*args).  A kernel
    that fails (a compile failure: before any write to the arguments) sends this and every later call to the
    torch form, with one warning; running out of GPU memory is not a failure of the kernel and is raised."""
    if args[0].is_cuda and available() and not _broken:
        try:
            return kernel(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            _broken.append(e)
            warnings.warn(f"QuantEase Triton kernels unavailable ({type(e).__name__}: {e}); using torch")
    return fallback(*args)


if triton is not None:
    @triton.jit
    def _rint(x):
        """Round half to even, like torch.round (written out: the interpreter lacks libdevice.rint)."""
        r = tl.floor(x + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _cd_block(q_ptr, codes_ptr, r_ptr, sig_ptr, invd_ptr, scale_ptr, zero_ptr, changed_ptr,
                  N, K, b1, nb, maxq, BM: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        cols = tl.arange(0, BLOCK)
        rmask = rows < N
        cmask = cols < nb
        rb = tl.load(r_ptr + rows[:, None] * K + b1 + cols[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0)
        nchg = tl.zeros([BM], dtype=tl.int32)
        for i in range(0, nb):
            j = b1 + i
            rj = tl.sum(tl.where(cols[None, :] == i, rb, 0.0), axis=1)
            p = rows * K + j
            qj = tl.load(q_ptr + p, mask=rmask, other=0.0)
            s = tl.load(scale_ptr + p, mask=rmask, other=1.0)
            z = tl.load(zero_ptr + p, mask=rmask, other=0.0)
            old = tl.load(codes_ptr + p, mask=rmask, other=0.0)
            u = qj + rj * tl.load(invd_ptr + j)
            c = _rint(tl.div_rn(u, s)) + z
            c = tl.minimum(tl.maximum(c, 0.0), maxq)
            new = s * (c - z)
            tl.store(q_ptr + p, new, mask=rmask)
            tl.store(codes_ptr + p, c, mask=rmask)
            nchg += ((c != old) & rmask).to(tl.int32)
            srow = tl.load(sig_ptr + j * K + b1 + cols, mask=cmask, other=0.0)
            rb -= (new - qj)[:, None] * srow[None, :]
        tl.atomic_add(changed_ptr, tl.sum(nchg, axis=0))


def sweep(target, q, codes, r, sig, invd, col_scale, col_zero, bits, block=BLOCK):
    """Same contract as cd.sweep_torch (in place on q, codes, r; returns the changed-code count).
    The block width is the kernel's BLOCK (its register tile), whatever `block` says."""
    n, k = q.shape
    for t in (q, codes, r, sig, col_scale, col_zero):
        assert t.is_contiguous() and t.dtype == torch.float32
    changed = torch.zeros((), dtype=torch.int32, device=q.device)
    grid = (triton.cdiv(n, BM),)
    for b1 in range(0, k, BLOCK):
        b2 = min(b1 + BLOCK, k)
        old = q[:, b1:b2].clone()
        _cd_block[grid](q, codes, r, sig, invd, col_scale, col_zero, changed,
                        n, k, b1, b2 - b1, float(2 ** bits - 1), BM=BM, BLOCK=BLOCK)
        r -= (q[:, b1:b2] - old) @ sig[b1:b2, :]
    return changed
