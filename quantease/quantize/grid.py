"""Uniform b-bit grids per output channel or per group of input columns: w = scale * (code - zero).

scale, zero are float32 [N, G]; zero is integer-valued in [0, 2**bits - 1] (stored as uint8 in the
format); symmetric grids use zero = 2**(bits - 1).  Every quantizer fits its grid here and rounds
with `quantize`, so codes and grid_weight agree bit for bit everywhere.  `refit` re-solves (scale, zero)
for given codes in the Sigma metric (QuantEase alternates it with its sweeps).
"""
import torch

from quantease.errors import QuantEaseError
from quantease.format import layout

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def check_bits(bits):
    if bits not in layout.SUPPORTED_BITS:
        raise QuantEaseError(f"bits={bits} is not supported; choose one of {layout.SUPPORTED_BITS}")


def group_cols(k, group_size):
    """Group index of each input column, int64 [K]."""
    g = k if group_size == -1 else group_size
    return torch.arange(k) // g


def expand(t, k, group_size):
    """[N, G] per-group values -> [N, K] per-column values."""
    return t[:, group_cols(k, group_size).to(t.device)]


def _grouped(w, group_size):
    """[N, K] -> [N, G, g], the partial last group padded with zeros (0 is always on the grid)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    groups = layout.num_groups(k, group_size)
    pad = groups * g - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, groups, g)


def _minmax_grid(xmin, xmax, bits, sym):
    maxq = 2 ** bits - 1
    xmin = xmin.clamp(max=0)
    xmax = xmax.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        scale = 2 * xmax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = (xmax - xmin) / maxq
        zero = None
    # an all-zero row/group: any positive scale represents it exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # the checkpoint stores scales in fp16: fit with that value, so the errors we report are the checkpoint's
    scale = scale.to(torch.float16).to(torch.float32).clamp(min=2.0 ** -24)
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def fit(w, bits, group_size=-1, sym=False, clip=False, exclude=None, col_weight=None):
    """Min-max grid (0 kept in range) per row/group of w [N, K]; returns float32 scale, zero [N, G].

    exclude: optional bool [N, K]; those entries (outliers kept elsewhere) are ignored by the fit.
    clip: also try ranges shrunk by CLIP_RATIOS and keep, per row/group, the one with the lowest
    squared rounding error of the (non-excluded) entries, each weighted by col_weight [K] when given.
    The quantizers pass diag(Sigma): clipping a weight whose input channel is large is costly (an
    unweighted search made one SmolLM2 down_proj 15x worse)."""
    check_bits(bits)
    w = w.to(torch.float32)
    if exclude is not None:
        w = torch.where(exclude, torch.zeros_like(w), w)  # 0 costs nothing on any grid
    wg = _grouped(w, group_size)
    xmin, xmax = wg.amin(-1), wg.amax(-1)
    scale, zero = _minmax_grid(xmin, xmax, bits, sym)
    if not clip:
        return scale, zero
    cw = None if col_weight is None else _grouped(col_weight.to(torch.float32)[None, :], group_size)
    best = _group_err(wg, scale, zero, bits, cw)
    for r in CLIP_RATIOS[1:]:
        s, z = _minmax_grid(xmin * r, xmax * r, bits, sym)
        err = _group_err(wg, s, z, bits, cw)
        better = err < best
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
        best = torch.where(better, err, best)
    return scale, zero


def _group_err(wg, scale, zero, bits, cw=None):
    s, z = scale[..., None], zero[..., None]
    q = torch.clamp(torch.round(wg / s) + z, 0, 2 ** bits - 1)
    e = (s * (q - z) - wg) ** 2
    return (e if cw is None else e * cw).sum(-1)


def quantize(w, scale, zero, bits):
    """Nearest codes (float32, integer-valued) of w under a per-element/per-column scale, zero
    broadcastable to w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def dequantize(codes, scale, zero):
    return scale * (codes.to(torch.float32) - zero)


def quantize_tensor(w, scale, zero, bits, group_size):
    """w [N, K] with [N, G] grid -> float32 codes [N, K]."""
    k = w.shape[1]
    return quantize(w.to(torch.float32), expand(scale, k, group_size), expand(zero, k, group_size), bits)


def dequantize_tensor(codes, scale, zero, group_size):
    k = codes.shape[1]
    return dequantize(codes, expand(scale, k, group_size), expand(zero, k, group_size))


def _fp16(x):
    """Nearest fp16 value (as float64), kept positive: scales are stored in fp16."""
    return x.to(torch.float16).to(torch.float64).clamp(min=2.0 ** -24)


def _group_selectors(gidx):
    """Column selectors of each group for a group index per (working-order) column: slices when the
    groups are contiguous (no act-order), index tensors otherwise."""
    k = gidx.shape[0]
    if k == 0 or bool((gidx[1:] >= gidx[:-1]).all()):
        bounds = torch.nonzero(torch.diff(gidx.cpu())).flatten().tolist()
        starts, ends = [0] + [b + 1 for b in bounds], [b + 1 for b in bounds] + [k]
        return [slice(a, b) for a, b in zip(starts, ends)]
    return [torch.nonzero(gidx == g).flatten() for g in range(int(gidx.max()) + 1)]


def refit(q, codes, r, sig, scale, zero, bits, gidx, sym=False):
    """Least-squares grid for fixed codes: per row and group, the (scale, zero) that minimise
    f = tr(E Sigma E^T), E = target - Q, with Q = scale * (codes - zero) on that group's columns.

    q, codes, r = E sig are [N, K] float32 in the working column order, gidx [K] the group of each
    column; scale, zero [N, G] are updated in place, q and r too.  zero stays an integer in
    [0, 2**bits - 1] (symmetric grids keep theirs), scale stays fp16-representable.  Per group it
    solves the 2x2 normal equations for (scale, offset), tries the integer zeros next to the optimum
    (and the current one), rounds each candidate's best scale to fp16 and keeps the best candidate
    only if it lowers f, so f never increases.  Groups go one after another (r updated between them:
    groups of a row are coupled through Sigma).  Cost: one [N, K] x [K, K] GEMM over the group blocks
    of Sigma (per channel it also updates r); with groups one more for r.  Returns the number of
    (row, group) grids that changed."""
    maxq = 2 ** bits - 1
    changed = 0
    for g, sel in enumerate(_group_selectors(gidx)):
        s0 = scale[:, g].to(torch.float64)
        z0 = zero[:, g].to(torch.float64)
        b0 = codes[:, sel] - zero[:, g:g + 1]               # Q = s0 * b0 on this group
        sgg = sig[sel][:, sel] if isinstance(sel, torch.Tensor) else sig[sel, sel]
        bs = b0 @ sgg
        p = (bs * b0).sum(1, dtype=torch.float64)           # b0 Sigma b0
        p1 = bs.sum(1, dtype=torch.float64)                 # b0 Sigma 1
        s11 = sgg.sum(dtype=torch.float64)                  # 1 Sigma 1
        rg = r[:, sel]
        br = (b0 * rg).sum(1, dtype=torch.float64)          # b0 . r
        o = rg.sum(1, dtype=torch.float64)                  # 1 . r
        # a change D = alpha * b0 + beta * 1 of Q moves f by -2 D.r + D Sigma D
        best_df = torch.zeros_like(s0)
        best_s, best_z = s0.clone(), z0.clone()
        if sym:
            shifts = [torch.zeros_like(s0)]
        else:
            det = p * s11 - p1 * p1
            ok = det > 1e-12 * p.abs() * s11
            alpha = torch.where(ok, (s11 * br - p1 * o) / torch.where(ok, det, 1.0), 0.0)
            beta = torch.where(ok, (p * o - p1 * br) / torch.where(ok, det, 1.0), 0.0)
            s_star = s0 + alpha
            d_star = torch.where(ok & (s_star > 0), -beta / torch.where(s_star > 0, s_star, 1.0), 0.0)
            d_star = torch.minimum(torch.maximum(d_star, -z0), maxq - z0)  # an optimum off the range: its edge
            base = torch.floor(d_star)
            shifts = [base - 1, base, base + 1, base + 2, torch.zeros_like(s0)]
        for d in shifts:
            z1 = z0 + d
            valid = (z1 >= 0) & (z1 <= maxq)
            # Q' = s1 * (b0 - d) = Q + (s1 - s0) * (b0 - d) - s0 * d * 1
            bb = p - 2 * d * p1 + d * d * s11               # (b0 - d) Sigma (b0 - d)
            bdr = br - d * o                                 # (b0 - d) . r
            bd1 = p1 - d * s11                               # (b0 - d) Sigma 1
            gam = -s0 * d
            a = (bdr - gam * bd1) / torch.where(bb > 0, bb, 1.0)
            s1 = _fp16(s0 + a)
            a = s1 - s0
            df = -2 * (a * bdr + gam * o) + a * a * bb + 2 * a * gam * bd1 + gam * gam * s11
            take = valid & (bb > 0) & (df < best_df)
            best_df = torch.where(take, df, best_df)
            best_s = torch.where(take, s1, best_s)
            best_z = torch.where(take, z1, best_z)
        upd = best_df < 0
        if not bool(upd.any()):
            continue
        changed += int(upd.sum())
        new_s, new_z = best_s.to(torch.float32), best_z.to(torch.float32)
        qg = torch.where(upd[:, None], new_s[:, None] * (codes[:, sel] - new_z[:, None]), q[:, sel])
        if isinstance(sel, slice) and sel == slice(0, q.shape[1]):
            # one group per row: D Sigma = (s1 - s0) b0 Sigma - s1 d 1 Sigma, no second GEMM
            a = (new_s - scale[:, g]).to(torch.float32)
            c = new_s * (new_z - zero[:, g])
            r -= a[:, None] * bs - c[:, None] * sig.sum(0)[None, :]
        else:
            r -= (qg - q[:, sel]) @ (sig[sel] if isinstance(sel, torch.Tensor) else sig[sel, :])
        q[:, sel] = qg
        scale[:, g], zero[:, g] = new_s, new_z
    return changed
