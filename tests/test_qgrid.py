import pytest
import torch

from quantease.errors import QuantEaseError
from quantease.quantize import grid


def _w(n=6, k=40, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 40])
@pytest.mark.parametrize("sym", [False, True])
def test_fit_shapes_and_ranges(bits, group_size, sym):
    w = _w()
    scale, zero = grid.fit(w, bits, group_size, sym)
    groups = 1 if group_size == -1 else (40 + group_size - 1) // group_size
    assert scale.shape == zero.shape == (6, groups)
    assert scale.dtype == zero.dtype == torch.float32
    assert (scale > 0).all()
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2 ** bits - 1
    if sym:
        assert (zero == 2 ** (bits - 1)).all()
    codes = grid.quantize_tensor(w, scale, zero, bits, group_size)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    wq = grid.dequantize_tensor(codes, scale, zero, group_size)
    # min-max grid: every weight is within half a step of its grid value (symmetric grids lose the top code)
    step = grid.expand(scale, 40, group_size)
    slack = 1.0 if sym else 0.5
    assert ((wq - w).abs() <= step * slack + 1e-6).all()


def test_partial_last_group_uses_its_own_range():
    w = torch.zeros(1, 40)
    w[0, :32] = torch.linspace(-1, 1, 32)
    w[0, 32:] = torch.linspace(-100, 100, 8)  # only the last (partial) group is wide
    scale, _ = grid.fit(w, 4, 16)
    assert scale[0, 0] == scale[0, 1] and scale[0, 2] > 10 * scale[0, 0]


def test_zero_in_range_and_exact():
    w = torch.rand(4, 32) + 1.0  # all positive: the range must still include 0
    scale, zero = grid.fit(w, 3)
    assert (zero == 0).all()
    codes = grid.quantize_tensor(torch.zeros(4, 32), scale, zero, 3, -1)
    assert (grid.dequantize_tensor(codes, scale, zero, -1) == 0).all()


def test_all_zero_row():
    scale, zero = grid.fit(torch.zeros(2, 8), 3)
    assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("sym", [False, True])
def test_clip_never_worse_and_sometimes_better(sym):
    w = _w(32, 64, seed=3)
    w[:, 0] *= 6  # one big value per row: clipping it pays off
    errs = []
    for clip in (False, True):
        scale, zero = grid.fit(w, 3, 16, sym, clip)
        wq = grid.dequantize_tensor(grid.quantize_tensor(w, scale, zero, 3, 16), scale, zero, 16)
        errs.append(((wq - w) ** 2).reshape(32, 4, 16).sum(-1))
    assert (errs[1] <= errs[0] + 1e-6).all()
    assert (errs[1] < errs[0] - 1e-6).any()


def test_exclude_ignores_outliers():
    w = _w(4, 32)
    mask = torch.zeros_like(w, dtype=torch.bool)
    w[:, 5] = 50.0
    mask[:, 5] = True
    s_ex, _ = grid.fit(w, 3, exclude=mask)
    s_all, _ = grid.fit(w, 3)
    assert (s_ex < s_all / 5).all()


@pytest.mark.parametrize("bits", [0, 1, 5, 16, "3"])
def test_bad_bits(bits):
    with pytest.raises(QuantEaseError, match="bits="):
        grid.fit(_w(), bits)


def test_clip_weighted_by_column_importance():
    # a big weight on an important input channel must not be clipped; on an unimportant one it may
    w = torch.linspace(-1, 1, 32).repeat(2, 1)
    w[:, 0] = 8.0
    plain, _ = grid.fit(w, 3, clip=False)
    unweighted, _ = grid.fit(w, 3, clip=True)
    weight = torch.ones(32)
    weight[0] = 1e4
    weighted, _ = grid.fit(w, 3, clip=True, col_weight=weight)
    assert (unweighted < plain).all() and torch.equal(weighted, plain)


def test_fit_scales_are_fp16_exact():
    # the checkpoint stores scales in fp16 and the pipeline writes back qw.dequantize(): the two agree only
    # because fit returns fp16-representable scales
    g = torch.Generator().manual_seed(3)
    w = torch.randn(17, 96, generator=g) * torch.logspace(-6, 1, 17)[:, None]
    for sym in (False, True):
        for clip in (False, True):
            scale, _ = grid.fit(w, 3, 32, sym, clip)
            assert torch.equal(scale, scale.half().float())
