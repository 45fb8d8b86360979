"""QuantEase (Behdin et al. 2023): cyclic coordinate descent on f(Q) = tr((W - Q) Sigma (W - Q)^T).

With R = (W - Q) Sigma, the best grid value of column j (all rows at once, rows are independent) is
    q_j <- round_to_grid(q_j + R_j / Sigma_jj),      then  R <- R - (q_j_new - q_j_old) Sigma_j,:
which is exact for a 1-D quadratic, so f never increases.  Blocked like GPTQ: inside a block of B
columns the updates only need the B x B diagonal block of Sigma; one GEMM per block brings the rest of
R up to date, so a sweep costs ~2 N K^2 flops of GEMM plus K small column steps.

CD moves codes only.  With refit=True the grid (scale, zero) is refitted to the codes after every
sweep (grid.refit: least squares in the Sigma metric, integer zero, fp16 scale), also monotone in f;
rounds > 1 restart from GPTQ on the refitted grid (benchmarks/results/layer_quality.md has the gains).
"""
import time

import torch

from quantease.quantize import cd_triton, grid
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


def sweep(target, q, codes, r, sig, invd, col_scale, col_zero, bits, block=128):
    """One sweep: the Triton kernel on CUDA (one launch per block of columns), else torch."""
    return cd_triton.run(cd_triton.sweep, sweep_torch, target, q, codes, r, sig, invd, col_scale, col_zero, bits,
                         block)


def run_cd(target, sig_d, lam, dead, q, codes, col_scale, col_zero, bits, sweeps, block=128, refit=None):
    """Sweeps of CD on Q towards target (in place on q, codes); returns per-sweep (f, objective) and
    the number of sweeps that changed something.  Stops early once a sweep changes no code.

    refit: optional (scale, zero, gidx, sym): after each sweep the grid [N, G] is refitted for the
    new codes (grid.refit, in place; col_scale / col_zero follow), which also never increases f."""
    invd = 1.0 / torch.diagonal(sig_d)
    errors, objective = [], []
    done = 0
    r = (target - q) @ sig_d
    for _ in range(sweeps):
        changed = int(sweep(target, q, codes, r, sig_d, invd, col_scale, col_zero, bits, block))
        e = target - q
        r = e @ sig_d  # recomputed exactly after every sweep: no drift from the lazy updates
        if refit is not None:
            scale, zero, gidx, sym = refit
            moved = grid.refit(q, codes, r, sig_d, scale, zero, bits, gidx, sym)
            if moved:
                col_scale.copy_(scale[:, gidx])
                col_zero.copy_(zero[:, gidx])
                e = target - q
                changed += moved
        objective.append(float((e * r).sum()))
        errors.append(true_error(e, r, lam, dead))
        done += 1
        if changed == 0 and done > 1:
            break
    return errors, objective


def quantease(w, sigma, bits, group_size=-1, sym=False, damp=0.01, act_order=False, clip=False,
              init="w", sweeps=10, block=128, refit=False, rounds=1):
    """w [N, K], sigma [K, K] float32 on one device -> codes, scale, zero, info.

    refit: refit the grid to the codes after every sweep (grid.refit).  rounds > 1: after the first
    round (init + sweeps), start again from GPTQ on the current (refitted) grid, run the sweeps, and
    keep per row the better of the two (rows are independent in f, compared on the damped objective
    that CD minimises); without refit the restart would repeat round 1, so it is skipped.
    info["errors"] holds f after each sweep of round 1, then f of the per-row best after each later
    round."""
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
    w0 = w
    if perm is not None:
        w, q, codes = w[:, perm], q[:, perm].contiguous(), codes[:, perm].contiguous()
        col_scale, col_zero = col_scale[:, perm].contiguous(), col_zero[:, perm].contiguous()
        sigma_p = sigma[perm][:, perm]
    else:
        sigma_p = sigma
    sig_d, lam, dead = prepare_sigma(sigma_p, damp)
    init_error = None
    if init != "w":
        e = w - q
        init_error = true_error(e, e @ sig_d, lam, dead)
    gidx = grid.group_cols(k, group_size).to(w.device)
    if perm is not None:
        gidx = gidx[perm]
    rf = (scale, zero, gidx, sym) if refit else None
    errors, objective = run_cd(w, sig_d, lam, dead, q, codes, col_scale, col_zero, bits, sweeps, block, rf)
    if not refit:
        rounds = 1  # GPTQ on the unchanged grid would repeat round 1 exactly
    for _ in range(rounds - 1):
        e = w - q
        best = (e * (e @ sig_d)).sum(1)  # per-row damped objective
        scale2, zero2 = scale.clone(), zero.clone()
        codes2, _, _ = gptq(w0, sigma, bits, group_size, sym, damp, act_order=True, fixed_grid=(scale2, zero2))
        cs2, cz2 = grid.expand(scale2, k, group_size), grid.expand(zero2, k, group_size)
        if perm is not None:
            codes2, cs2, cz2 = codes2[:, perm].contiguous(), cs2[:, perm].contiguous(), cz2[:, perm].contiguous()
        q2 = grid.dequantize(codes2, cs2, cz2)
        run_cd(w, sig_d, lam, dead, q2, codes2, cs2, cz2, bits, sweeps, block,
               (scale2, zero2, gidx, sym) if refit else None)
        e2 = w - q2
        take = (e2 * (e2 @ sig_d)).sum(1) < best
        for a, b in ((q, q2), (codes, codes2), (scale, scale2), (zero, zero2)):
            a[take] = b[take]
        e = w - q
        r = e @ sig_d
        objective.append(float((e * r).sum()))
        errors.append(true_error(e, r, lam, dead))
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    info = dict(init=init, init_error=init_error, errors=errors, objective=objective, refit=refit, rounds=rounds,
                sweeps=len(errors), init_seconds=t_init, cd_seconds=time.time() - t0 - t_init)
    return codes, scale, zero, info
