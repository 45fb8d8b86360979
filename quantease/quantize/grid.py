"""Uniform b-bit grids per output channel or per group of input columns: w = scale * (code - zero).

scale, zero are float32 [N, G]; zero is integer-valued in [0, 2**bits - 1] (stored as uint8 in the
format); symmetric grids use zero = 2**(bits - 1).  Every quantizer fits its grid here and rounds
with `quantize`, so codes and grid_weight agree bit for bit everywhere.
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
