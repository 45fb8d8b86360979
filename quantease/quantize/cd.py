"""QuantEase (Behdin et al. 2023): cyclic coordinate descent on f(Q) = tr((W - Q) Sigma (W - Q)^T).

With R = (W - Q) Sigma, the best grid value of column j (all rows at once, rows are independent) is
    q_j <- round_to_grid(q_j + R_j / Sigma_jj),      then  R <- R - (q_j_new - q_j_old) Sigma_j,:
which is exact for a 1-D quadratic, so f never increases.  Blocked like GPTQ: inside a block of B
columns the updates only need the B x B diagonal block of Sigma; one GEMM per block brings the rest of
R up to date, so a sweep costs ~2 N K^2 flops of GEMM plus K small column steps.

The grid (scale, zero) stays fixed from the init; CD only moves codes.
"""
import time
import warnings

import torch

from quantease.quantize import grid
from quantease.quantize.gptq import gptq
from quantease.quantize.rtn import rtn

INITS = ("w", "rtn", "gptq")


def prepare_sigma(sigma, damp):
    """Damped Sigma for the updates: dead columns (Sigma_jj = 0, their row/column is 0) get 1 on
    the diagonal, so their update is plain rounding of W.  Returns (sigma_d, lam, dead)."""
    s = sigma.clone()
    diag = torch.diagonal(s)
    dead = diag == 0
    diag[dead] = 1
    lam = damp * float(diag.mean())
    diag += lam
    return s, lam, dead


def true_error(e, r, lam, dead):
    """f on the undamped Sigma from E and R = E Sigma_d."""
    f = (e * r).sum() - lam * (e * e).sum()
    if dead.any():
        f -= (e[:, dead] ** 2).sum()
    return float(f)


def sweep_torch(target, q, codes, r, sig, invd, col_scale, col_zero, bits, block):
    """One cyclic pass over the columns, in place on q (grid values), codes and r.  Returns the number
    of codes that changed (a 0-dim tensor).  Works on transposed copies so that a column is a
    contiguous row (2x faster on CPU than strided columns), with in-place ops to cut allocations."""
    qt, ct, rt = q.T.contiguous(), codes.T.contiguous(), r.T.contiguous()
    st, zt = col_scale.T.contiguous(), col_zero.T.contiguous()
    k = qt.shape[0]
    inv = invd.tolist()
    maxq = 2 ** bits - 1
    changed = torch.zeros((), dtype=torch.int64, device=q.device)
    for b1 in range(0, k, block):
        b2 = min(b1 + block, k)
        qb = qt[b1:b2]
        old = qb.clone()
        rb = rt[b1:b2].clone()
        sb = sig[b1:b2, b1:b2]
        for i in range(b2 - b1):
            j = b1 + i
            u = torch.add(qb[i], rb[i], alpha=inv[j])  # the unconstrained optimum of coordinate j
            c = torch.round_(u.div_(st[j])).add_(zt[j]).clamp_(0, maxq)  # == grid.quantize
            new = (c - zt[j]).mul_(st[j])
            d = new - qb[i]
            qb[i] = new
            changed += (c != ct[j]).sum()
            ct[j] = c
            rb[i + 1:].addr_(sb[i, i + 1:], d, alpha=-1)
        rt -= sig[:, b1:b2] @ (qb - old)
    q.copy_(qt.T)
    codes.copy_(ct.T)
    r.copy_(rt.T)
    return changed


_triton_broken = []


def sweep(target, q, codes, r, sig, invd, col_scale, col_zero, bits, block=128):
    """One sweep: the Triton kernel on CUDA (one launch per block of columns), else torch."""
    if q.is_cuda and not _triton_broken:
        from quantease.quantize import cd_triton
        if cd_triton.available():
            try:
                return cd_triton.sweep(target, q, codes, r, sig, invd, col_scale, col_zero, bits, block)
            except Exception as e:  # a compile failure happens before any write: fall back once, loudly
                _triton_broken.append(e)
                warnings.warn(f"QuantEase Triton sweep unavailable ({type(e).__name__}: {e}); using torch")
    return sweep_torch(target, q, codes, r, sig, invd, col_scale, col_zero, bits, block)


def run_cd(target, sig_d, lam, dead, q, codes, col_scale, col_zero, bits, sweeps, block=128):
    """Sweeps of CD on Q towards target (in place on q, codes); returns per-sweep (f, objective) and
    the number of sweeps that changed something.  Stops early once a sweep changes no code."""
    invd = 1.0 / torch.diagonal(sig_d)
    errors, objective = [], []
    done = 0
    r = (target - q) @ sig_d
    for _ in range(sweeps):
        changed = int(sweep(target, q, codes, r, sig_d, invd, col_scale, col_zero, bits, block))
        e = target - q
        r = e @ sig_d  # recomputed exactly after every sweep: no drift from the lazy updates
        objective.append(float((e * r).sum()))
        errors.append(true_error(e, r, lam, dead))
        done += 1
        if changed == 0 and done > 1:
            break
    return errors, objective


def quantease(w, sigma, bits, group_size=-1, sym=False, damp=0.01, act_order=False, clip=False,
              init="w", sweeps=10, block=128):
    """w [N, K], sigma [K, K] float32 on one device -> codes, scale, zero, info."""
    t0 = time.time()
    n, k = w.shape
    w = w.to(torch.float32)
    if init == "gptq":
        codes, scale, zero = gptq(w, sigma, bits, group_size, sym, damp, act_order=True, clip=clip)
    else:
        codes, scale, zero = rtn(w, bits, group_size, sym, clip, torch.diagonal(sigma))
    col_scale = grid.expand(scale, k, group_size)
    col_zero = grid.expand(zero, k, group_size)
    q = w.clone() if init == "w" else grid.dequantize(codes, col_scale, col_zero)
    if w.is_cuda:
        torch.cuda.synchronize()
    t_init = time.time() - t0

    perm = torch.argsort(torch.diagonal(sigma), descending=True) if act_order else None
    if perm is not None:
        w, q, codes = w[:, perm], q[:, perm].contiguous(), codes[:, perm].contiguous()
        col_scale, col_zero = col_scale[:, perm].contiguous(), col_zero[:, perm].contiguous()
        sigma = sigma[perm][:, perm]
    sig_d, lam, dead = prepare_sigma(sigma, damp)
    init_error = None
    if init != "w":
        e = w - q
        init_error = true_error(e, e @ sig_d, lam, dead)
    errors, objective = run_cd(w, sig_d, lam, dead, q, codes, col_scale, col_zero, bits, sweeps, block)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    info = dict(init=init, init_error=init_error, errors=errors, objective=objective,
                sweeps=len(errors), init_seconds=t_init, cd_seconds=time.time() - t0 - t_init)
    return codes, scale, zero, info
