"""kernels/outliers.py: the split-slot outlier add (ell_split_add) against the dense float64 product, on odd shapes:
N not a multiple of BN, R not a multiple of RS (padding slots: zero values repeating the last index), M tiles that
straddle M; gathering from x and from its transpose.  y starts from random values (the kernel adds in place)."""
import pytest
import torch

from test_kernels import DEVICE, TOL, check, make_weight, needs_triton  # first: sets TRITON_INTERPRET
from quantease.kernels import outliers


def dense_outliers(idx, val, k):
    h = torch.zeros(idx.shape[0], k, dtype=torch.float64)
    h.scatter_add_(1, idx.long().cpu(), val.double().cpu())
    return h


@needs_triton
@pytest.mark.parametrize("m", (1, 3, 5, 16, 30, 65))
@pytest.mark.parametrize("transposed", (False, True))
def test_split_add_matches_dense(m, transposed):
    n, k = 45, 700
    w = make_weight(n, k, 3, -1, 0.06, False, seed=m)  # R = 42 slots: two programs of 32 along the slots
    idx, val = w[3], w[4]
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).half().to(DEVICE)
    y0 = torch.randn(m, n, generator=g).half().to(DEVICE)
    xt = x.t().contiguous() if transposed else None
    y = outliers.ell_split_add(x, idx, val, y0.clone(), xt=xt)
    ref = y0.double().cpu() + x.double().cpu() @ dense_outliers(idx, val, k).t()
    check(y.cpu(), ref, torch.float16)


@needs_triton
@pytest.mark.parametrize("config", ((16, 8, 4), (32, 16, 2), (16, 64, 1)))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_split_add_configs(config, dtype):
    n, k, m = 37, 520, 7
    w = make_weight(n, k, 3, -1, 0.04, True, seed=config[1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    y = outliers.ell_split_add(x, w[3], w[4], torch.zeros(m, n, dtype=dtype, device=DEVICE), config=config)
    check(y.cpu(), x.double().cpu() @ dense_outliers(w[3], w[4], k).t(), dtype)


def test_split_config_sizes():
    """BM up to 16, RS up to 32 slots, about SPLIT_ELEMS gathered elements per program."""
    assert outliers.split_config(1, 41) == (128, 32, 1)
    assert outliers.split_config(16, 41) == (16, 32, 16)
    assert outliers.split_config(100, 3) == (64, 4, 16)
    for m, r in ((1, 1), (4, 143), (16, 20), (128, 41)):
        bn, rs, bm = outliers.split_config(m, r)
        assert bm <= 16 and rs <= outliers.SPLIT_RS_MAX and bn * rs * bm <= max(outliers.SPLIT_ELEMS, 16 * rs * bm)
