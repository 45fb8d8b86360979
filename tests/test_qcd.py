import itertools

import pytest
import torch

from qhelpers import f_of, make_layer, run_interpreted
from quantease.quantize import grid, quantize_weight
from quantease.quantize.cd import prepare_sigma, sweep_torch


def test_coordinatewise_optimal_after_convergence():
    w, s = make_layer(6, 12, seed=4)
    q = quantize_weight(w, s, bits=2, method="quantease", damp=0.0, sweeps=100)
    assert q.info["sweeps"] < 100  # converged: the last sweep changed no code
    f0 = f_of(w, q.dequantize(), s)
    codes = q.codes.to(torch.float32)
    for i, j in itertools.product(range(6), range(12)):
        for c in range(4):
            trial = codes.clone()
            trial[i, j] = c
            wq = grid.dequantize(trial, q.scale, q.zero)
            assert f_of(w, wq, s) >= f0 * (1 - 1e-9)


@pytest.mark.parametrize("init", ["w", "rtn", "gptq"])
@pytest.mark.parametrize("group_size", [-1, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_f_monotone_over_sweeps(init, group_size, act_order):
    w, s = make_layer(10, 40, seed=5)
    q = quantize_weight(w, s, bits=3, method="quantease", init=init, group_size=group_size,
                        act_order=act_order, sweeps=6, damp=0.0)
    errs = q.info["errors"]
    if q.info["init_error"] is not None:
        errs = [q.info["init_error"]] + errs
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errs, errs[1:]))
    assert q.info["errors"][-1] == pytest.approx(f_of(w, q.dequantize(), s), rel=1e-4)
    assert len(q.info["rel_errors"]) == len(q.info["errors"])


def test_objective_monotone_with_damping():
    w, s = make_layer(10, 40, seed=6)
    q = quantize_weight(w, s, bits=3, method="quantease", init="rtn", sweeps=6, damp=0.1)
    obj = q.info["objective"]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(obj, obj[1:]))


def test_brute_force_1x4():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 4, generator=g) @ torch.tensor([[1, .8, 0, 0], [0, 1, .6, 0], [0, 0, 1, .9], [0, 0, 0, 1.]])
    s = x.T @ x
    w = torch.randn(1, 4, generator=g)
    q = quantize_weight(w, s, bits=2, method="quantease", damp=0.0, sweeps=50)
    r = quantize_weight(w, s, bits=2, method="rtn")
    f_cd, f_rtn = f_of(w, q.dequantize(), s), f_of(w, r.dequantize(), s)
    best = min(f_of(w, grid.dequantize(torch.tensor([c], dtype=torch.float32), q.scale, q.zero), s)
               for c in itertools.product(range(4), repeat=4))
    assert best <= f_cd * (1 + 1e-9) and f_cd <= f_rtn * (1 + 1e-9)
    # local optimum: no single coordinate move helps
    for j in range(4):
        for c in range(4):
            t = q.codes.to(torch.float32).clone()
            t[0, j] = c
            assert f_of(w, grid.dequantize(t, q.scale, q.zero), s) >= f_cd * (1 - 1e-9)


def test_blocked_sweep_equals_unblocked():
    w, s = make_layer(8, 50, seed=8)
    s = s / s.diagonal().mean()
    sig, _, _ = prepare_sigma(s, 0.01)
    invd = 1 / sig.diagonal()
    scale, zero = grid.fit(w, 3)
    cs, cz = grid.expand(scale, 50, -1), grid.expand(zero, 50, -1)
    out = []
    for block in (1, 7, 128):
        q, codes = w.clone(), torch.zeros_like(w)
        for _ in range(3):
            r = (w - q) @ sig
            sweep_torch(w, q, codes, r, sig, invd, cs, cz, 3, block)
        out.append(codes)
    assert (out[0] != out[1]).float().mean() < 0.01 and (out[0] != out[2]).float().mean() < 0.01


@pytest.mark.parametrize("init", ["w", "rtn", "gptq"])
def test_cd_beats_rtn_and_init(init):
    w, s = make_layer(16, 64, seed=9)
    r = quantize_weight(w, s, bits=3, method="rtn")
    q = quantize_weight(w, s, bits=3, method="quantease", init=init, sweeps=8)
    assert q.info["rel_error"] < r.info["rel_error"]
    if init == "gptq":
        g = quantize_weight(w, s, bits=3, method="gptq")
        assert q.info["rel_error"] <= g.info["rel_error"] * (1 + 1e-6)


def test_scale_invariant_in_sigma():
    w, s = make_layer(8, 32, seed=10)
    a = quantize_weight(w, s, bits=3, method="quantease", sweeps=4)
    b = quantize_weight(w, s * 1e6, bits=3, method="quantease", sweeps=4)
    assert torch.equal(a.codes, b.codes)
    assert b.info["rel_error"] == pytest.approx(a.info["rel_error"], rel=1e-4)
    assert b.info["error"] == pytest.approx(a.info["error"] * 1e6, rel=1e-3)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_in_range_sym_groups(sym, bits):
    w, s = make_layer(8, 40, seed=11)
    q = quantize_weight(w, s, bits=bits, method="quantease", sym=sym, group_size=16, sweeps=3)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** bits - 1
    assert q.scale.shape == (8, 3)
    if sym:
        assert (q.zero == 2 ** (bits - 1)).all()


def test_dead_columns_rounded():
    w, s = make_layer(8, 32, seed=12)
    s[:, [2, 9]] = 0
    s[[2, 9], :] = 0
    # the grid stays the init's (no refit, one round): dead columns must be the plain rounding of W
    q = quantize_weight(w, s, bits=3, method="quantease", sweeps=4, refit=False, rounds=1)
    r = quantize_weight(w, s, bits=3, method="rtn", clip=True)  # the same (clipped) grid as q's
    assert torch.equal(q.scale, r.scale)
    assert torch.equal(q.codes[:, [2, 9]], r.codes[:, [2, 9]])
    assert all(map(lambda x: x == x, q.info["errors"]))


TRITON_CHECK = """
import sys, torch
sys.path.insert(0, "tests")
from qhelpers import make_layer
from quantease.quantize import grid, cd_triton
from quantease.quantize.cd import prepare_sigma, sweep_torch
n, k, gs = 21, 150, 32
w, s = make_layer(n, k, seed=8, tokens=512)
sig, _, _ = prepare_sigma(s / s.diagonal().mean(), 0.01)
invd = 1 / sig.diagonal()
scale, zero = grid.fit(w, 3, gs)
cs, cz = grid.expand(scale, k, gs).contiguous(), grid.expand(zero, k, gs).contiguous()
out = []
for fn in (sweep_torch, cd_triton.sweep):
    q, codes, ch = w.clone(), torch.zeros_like(w), []
    for _ in range(2):
        ch.append(int(fn(w, q, codes, (w - q) @ sig, sig, invd, cs, cz, 3, 128)))
    out.append((codes, q, ch))
assert torch.equal(out[0][0], out[1][0]), "codes differ"
assert torch.allclose(out[0][1], out[1][1]), "grid values differ"
assert out[0][2] == out[1][2], (out[0][2], out[1][2])
print("ok")
"""


def test_triton_sweep_matches_torch_in_interpreter():
    """The CUDA kernel's arithmetic, run by Triton's CPU interpreter, equals the torch sweep."""
    pytest.importorskip("triton")
    run_interpreted(TRITON_CHECK)
