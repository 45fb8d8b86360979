import pytest
import torch

from qhelpers import f_of, make_layer
from quantease.format import layout
from quantease.quantize import layer_error, quantize_weight
from quantease.quantize.outliers import optimal_values


def _layer(seed=13):
    w, s = make_layer(16, 100, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w[torch.rand(w.shape, generator=g) < 0.02] *= 10  # heavy-tailed weights, as in LLMs
    return w, s


def _on_grid(q, w):
    """Q really is quantized: codes in range, at most 2**bits distinct values per row/group, Q != W."""
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** q.bits - 1
    gw = q.grid_weight()
    cols = torch.arange(w.shape[1]) // (w.shape[1] if q.group_size == -1 else q.group_size)
    assert torch.equal(gw, q.scale[:, cols] * (q.codes.float() - q.zero[:, cols]))
    for row in gw:
        for gi in cols.unique():
            assert row[cols == gi].unique().numel() <= 2 ** q.bits
    assert (gw - w).abs().max() > 0


@pytest.mark.parametrize("init", ["w", "rtn", "gptq"])
@pytest.mark.parametrize("fraction", [0.02, 0.05])
def test_unstructured_outliers(init, fraction):
    w, s = _layer()
    plain = quantize_weight(w, s, bits=3, method="quantease", init=init, sweeps=6)
    q = quantize_weight(w, s, bits=3, method="quantease", init=init, sweeps=6, outlier_fraction=fraction)
    r = layout.outlier_slots(100, fraction)
    assert q.outlier_idx.shape == q.outlier_val.shape == (16, r)
    assert q.outlier_idx.dtype == torch.int64 and q.outlier_val.dtype == torch.float16
    assert (q.outlier_idx[:, 1:] > q.outlier_idx[:, :-1]).all()  # sorted, distinct
    assert q.num_outliers <= 16 * r and (q.outlier_weight() != 0).sum(1).max() <= r
    _on_grid(q, w)
    assert torch.equal(q.scale, q.scale.half().float())  # the (refitted) scales stay fp16-exact
    assert torch.equal(q.zero, q.zero.round()) and q.zero.min() >= 0 and q.zero.max() <= 7
    f = f_of(w, q.dequantize(), s)
    assert f < 0.7 * f_of(w, plain.dequantize(), s)
    # the reported error is that of the stored (fp16) values
    assert q.info["error"] == pytest.approx(layer_error(w, q.dequantize(), s)[0], rel=1e-4)
    assert q.info["errors"][-1] == pytest.approx(f, rel=1e-3)


def test_structured_outliers_share_columns():
    w, s = _layer(14)
    plain = quantize_weight(w, s, bits=3, method="quantease", sweeps=6)
    q = quantize_weight(w, s, bits=3, method="quantease", sweeps=6, outlier_fraction=0.05,
                        structured_outliers=True)
    assert (q.outlier_idx == q.outlier_idx[0]).all() and q.outlier_idx.shape == (16, 5)
    _on_grid(q, w)
    assert f_of(w, q.dequantize(), s) < f_of(w, plain.dequantize(), s)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_outliers_act_order_groups(act_order, group_size):
    w, s = _layer(15)
    q = quantize_weight(w, s, bits=3, method="quantease", sweeps=4, outlier_fraction=0.03,
                        act_order=act_order, group_size=group_size)
    _on_grid(q, w)
    assert q.info["error"] == pytest.approx(layer_error(w, q.dequantize(), s)[0], rel=1e-4)


def test_optimal_values_solve_normal_equations():
    w, s = make_layer(4, 20, seed=16)
    idx = torch.tensor([[1, 5], [0, 19], [3, 4], [7, 8]])
    val = optimal_values(w, s, idx, False)
    h = torch.zeros_like(w).scatter_(1, idx, val)
    grad = (w - h) @ s  # zero on the support at the optimum
    assert torch.gather(grad, 1, idx).abs().max() < 1e-3 * grad.abs().max()


def test_too_few_slots_gives_empty_ell():
    w, s = make_layer(4, 20)
    q = quantize_weight(w, s, bits=3, outlier_fraction=0.01)  # 0.01 * 20 < 1 slot
    assert q.outlier_idx.shape == (4, 0) and q.num_outliers == 0


def test_extremes_support_takes_the_split_that_shrinks_the_range():
    from quantease.quantize.outliers import extremes_support
    g = torch.Generator().manual_seed(17)
    w = torch.randn(3, 64, generator=g) * 0.1
    w[0, [3, 40]] = 5.0             # two big positive weights: both slots from the top
    w[1, 7], w[1, 50] = 5.0, -5.0   # one each side
    w[2, [10, 20]] = -5.0           # two big negative weights
    idx = extremes_support(w, torch.eye(64), 2, bits=3, clip=True)
    assert [sorted(row) for row in idx.tolist()] == [[3, 40], [7, 50], [10, 20]]


@pytest.mark.parametrize("group_size", [-1, 32])
def test_outlier_rounds_keep_the_better_row(group_size):
    w, s = _layer(18)
    one = quantize_weight(w, s, bits=3, sweeps=4, outlier_fraction=0.03, rounds=1, group_size=group_size)
    two = quantize_weight(w, s, bits=3, sweeps=4, outlier_fraction=0.03, rounds=2, group_size=group_size)
    assert two.info["support"] == ["extremes", 0.5] and one.info["support"] == "extremes"
    _on_grid(two, w)
    assert (two.outlier_idx[:, 1:] > two.outlier_idx[:, :-1]).all()
    e1, e2 = w - one.dequantize(), w - two.dequantize()
    f1, f2 = ((e1 @ s) * e1).sum(1), ((e2 @ s) * e2).sum(1)
    assert (f2 <= f1 * (1 + 1e-5)).all()  # round 1 is one of the candidates of every row
    assert two.info["error"] == pytest.approx(layer_error(w, two.dequantize(), s)[0], rel=1e-4)
    assert two.info["errors"][-1] == pytest.approx(two.info["error"], rel=1e-3)
