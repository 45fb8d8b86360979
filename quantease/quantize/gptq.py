"""GPTQ (Frantar et al. 2022), after IST-DASLab/gptq: quantize columns in order, push each column's
rounding error onto the not-yet-quantized columns through the Cholesky factor of Sigma^{-1}.

Blocked lazy updates (block 128), relative damping, act-order, groups.  The format has no g_idx, so
with act-order the groups are "static": fitted up front on the original column order.  Without
act-order groups are fitted when the sweep reaches them, on the error-compensated weights.
On CUDA the column sweep of a static grid is gptq_triton's kernel (one launch per block of columns);
`columns` here, the torch loop, defines it and runs everywhere else.
"""
import torch

from quantease.errors import QuantEaseError
from quantease.quantize import cd_triton, grid, gptq_triton


def hinv_cholesky(sigma, damp):
    """Upper Cholesky factor of (Sigma + damp * mean(diag) I)^{-1}; dead columns get diag 1.
    Damping grows x10 (up to 4 times) if Sigma is numerically singular."""
    h = sigma.clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1
    base = diag.mean()
    lam = damp
    for _ in range(5):
        hd = h + lam * base * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        l, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
        lam = max(lam * 10, 1e-6)
    raise QuantEaseError("Sigma is not positive definite even after damping; check the calibration data")


def columns(w, hinv, col_scale, col_zero, bits, block=128, fit=None, group_size=-1):
    """The column sweep (torch): quantize each column of w [N, K] (float32, updated in place) and push its error
    onto the later ones through hinv, lazily per block of columns; -> float32 codes [N, K].  fit(j, cols): called
    at each group's first column j with the group's current columns (it writes col_scale / col_zero there)."""
    k = w.shape[1]
    codes = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if fit is not None and j % group_size == 0:
                fit(j, torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :group_size])
            col = w1[:, i]
            q = grid.quantize(col, col_scale[:, j], col_zero[:, j], bits)
            codes[:, j] = q
            e = (col - grid.dequantize(q, col_scale[:, j], col_zero[:, j])) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def gptq(w, sigma, bits, group_size=-1, sym=False, damp=0.01, act_order=True, clip=False, block=128,
         fixed_grid=None):
    """w [N, K], sigma [K, K] (float32, same device) -> float32 codes [N, K], scale [N, G], zero [N, G].

    fixed_grid: optional (scale, zero) to use instead of fitting one (e.g. fitted without outliers)."""
    n, k = w.shape
    w = w.to(torch.float32).clone()
    perm = torch.argsort(torch.diagonal(sigma), descending=True) if act_order else None
    static = group_size == -1 or act_order or fixed_grid is not None
    if static:
        scale, zero = fixed_grid if fixed_grid is not None else grid.fit(w, bits, group_size, sym, clip,
                                                                            col_weight=torch.diagonal(sigma))
        col_scale = grid.expand(scale, k, group_size)
        col_zero = grid.expand(zero, k, group_size)
    else:
        groups = (k + group_size - 1) // group_size
        scale = torch.empty(n, groups, device=w.device)
        zero = torch.empty(n, groups, device=w.device)
        col_scale = torch.empty_like(w)
        col_zero = torch.empty_like(w)
    if perm is not None:
        w, sigma = w[:, perm], sigma[perm][:, perm]
        col_scale, col_zero = col_scale[:, perm], col_zero[:, perm]
    hinv = hinv_cholesky(sigma, damp)
    if static:
        codes = cd_triton.run(gptq_triton.columns, columns, w, hinv, col_scale, col_zero, bits, block)
    else:
        def fit(j, cols):  # group j // group_size, on the current (error-compensated) weights of its columns
            s, z = grid.fit(cols, bits, -1, sym, clip, col_weight=torch.diagonal(sigma)[j:j + cols.shape[1]])
            gi = j // group_size
            scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
            col_scale[:, j:j + group_size] = s
            col_zero[:, j:j + group_size] = z
        codes = columns(w, hinv, col_scale, col_zero, bits, block, fit, group_size)

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero
