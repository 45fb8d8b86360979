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
