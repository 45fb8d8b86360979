"""grid.refit (least-squares scale/zero for fixed codes) and the QuantEase options that use it."""
import pytest
import torch

from qhelpers import f_of, make_layer
from quantease.errors import QuantEaseError
from quantease.quantize import grid, quantize_weight
from quantease.quantize.cd import prepare_sigma


def _state(n=12, k=40, bits=3, group_size=-1, seed=20, perm=False, sym=False):
    """A target, damped Sigma and codes of a clipped RTN grid, in a (possibly permuted) column order."""
    w, s = make_layer(n, k, seed=seed)
    s = s / s.diagonal().mean()
    scale, zero = grid.fit(w, bits, group_size, sym, clip=True, col_weight=s.diagonal())
    gidx = grid.group_cols(k, group_size)
    if perm:
        p = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        w, s, gidx = w[:, p], s[p][:, p], gidx[p]
    sig, _, _ = prepare_sigma(s, 0.01)
    codes = grid.quantize(w, scale[:, gidx], zero[:, gidx], bits)
    q = grid.dequantize(codes, scale[:, gidx], zero[:, gidx])
    return w, sig, codes, q, scale, zero, gidx


def _f_rows(w, q, sig):
    e = (w - q).double()
    return ((e @ sig.double()) * e).sum(1)


@pytest.mark.parametrize("group_size,perm", [(-1, False), (16, False), (16, True), (8, True)])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_refit_lowers_f_keeps_format(group_size, perm, bits, sym):
    w, sig, codes, q, scale, zero, gidx = _state(bits=bits, group_size=group_size, perm=perm, sym=sym)
    f0 = _f_rows(w, q, sig)
    r = (w - q) @ sig
    codes0, zero0 = codes.clone(), zero.clone()
    moved = grid.refit(q, codes, r, sig, scale, zero, bits, gidx, sym)
    f1 = _f_rows(w, q, sig)
    assert moved > 0 and (f1 <= f0 * (1 + 1e-6)).all() and f1.sum() < (1 - 1e-3) * f0.sum()
    assert torch.equal(codes, codes0)                            # codes are not touched
    assert torch.equal(scale, scale.half().float()) and (scale > 0).all()   # fp16-exact scales
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2 ** bits - 1
    if sym:
        assert torch.equal(zero, zero0)
    assert torch.equal(q, grid.dequantize(codes, scale[:, gidx], zero[:, gidx]))  # q is on the new grid
    assert torch.allclose(r, (w - q) @ sig, atol=1e-4 * float(r.abs().max()))    # r kept up to date


def test_refit_is_least_squares_per_row():
    """Per-channel: no integer zero in range with its best fp16 scale does better (brute force)."""
    w, sig, codes, q, scale, zero, gidx = _state(n=6, k=30, bits=3, seed=21)
    grid.refit(q, codes, (w - q) @ sig, sig, scale, zero, 3, gidx)
    f = _f_rows(w, q, sig)
    c, wd, sd = codes.double(), w.double(), sig.double()
    for i in range(6):
        best = float("inf")
        for z in range(8):
            b = c[i] - z
            s_opt = float(wd[i] @ sd @ b / (b @ sd @ b))
            for s in (torch.tensor(s_opt).half().float(), ):
                if s > 0:
                    e = wd[i] - float(s) * b
                    best = min(best, float(e @ sd @ e))
        assert f[i] <= best * (1 + 1e-5)


def test_refit_keeps_a_grid_that_is_already_optimal():
    w, sig, codes, q, scale, zero, gidx = _state(seed=22)
    r = (w - q) @ sig
    grid.refit(q, codes, r, sig, scale, zero, 3, gidx)
    s1, z1, q1 = scale.clone(), zero.clone(), q.clone()
    assert grid.refit(q, codes, r, sig, scale, zero, 3, gidx) == 0  # a second refit finds nothing to gain
    assert torch.equal(scale, s1) and torch.equal(zero, z1) and torch.equal(q, q1)


@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_refit_and_rounds_never_worse(group_size, act_order):
    w, s = make_layer(16, 64, seed=23)
    kw = dict(bits=3, method="quantease", group_size=group_size, act_order=act_order, damp=0.0, sweeps=6)
    fixed = quantize_weight(w, s, refit=False, rounds=1, **kw)
    refit = quantize_weight(w, s, refit=True, rounds=1, **kw)
    two = quantize_weight(w, s, refit=True, rounds=2, **kw)
    f = [f_of(w, q.dequantize(), s) for q in (fixed, refit, two)]
    assert f[1] <= f[0] * (1 + 1e-5) and f[2] <= f[1] * (1 + 1e-5)
    errs = [two.info["init_error"]] + two.info["errors"]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errs, errs[1:]))
    assert two.info["errors"][-1] == pytest.approx(f[2], rel=1e-4)
    assert two.info["rounds"] == 2 and two.info["refit"] is True
    assert torch.equal(two.scale, two.scale.half().float())


def test_rounds_must_be_positive():
    w, s = make_layer(4, 16)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(QuantEaseError, match="rounds="):
            quantize_weight(w, s, rounds=bad)
