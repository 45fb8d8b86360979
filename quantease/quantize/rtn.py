"""Round to nearest on a min-max (optionally clipped) grid: the baseline and an init for QuantEase."""
from quantease.quantize import grid


def rtn(w, bits, group_size=-1, sym=False, clip=False, col_weight=None):
    """w [N, K] -> float32 codes [N, K], scale [N, G], zero [N, G] (col_weight: see grid.fit)."""
    scale, zero = grid.fit(w, bits, group_size, sym, clip, col_weight=col_weight)
    codes = grid.quantize_tensor(w, scale, zero, bits, group_size)
    return codes, scale, zero
