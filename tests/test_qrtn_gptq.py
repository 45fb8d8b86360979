import pytest
import torch

from qhelpers import f_of, make_layer, run_interpreted
from quantease.quantize import grid, quantize_weight
from quantease.quantize.gptq import gptq
from quantease.quantize.rtn import rtn


def gptq_unblocked(w, sigma, bits, damp):
    """Textbook GPTQ, no blocking, no act-order, per-channel grid: the reference for the blocked one."""
    n, k = w.shape
    scale, zero = grid.fit(w, bits)
    w = w.clone().double()
    h = sigma.double() + damp * sigma.diagonal().mean().double() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(n, k)
    for j in range(k):
        c = grid.quantize(w[:, j].float(), scale[:, 0], zero[:, 0], bits)
        codes[:, j] = c
        err = (w[:, j] - grid.dequantize(c, scale[:, 0], zero[:, 0]).double()) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        # Sigma^{-1} of the remaining columns: Schur complement (the OBS update)
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


def test_gptq_blocked_equals_unblocked():
    w, s = make_layer(12, 70, seed=1)
    s = s / s.diagonal().mean()
    ref = gptq_unblocked(w, s, 3, 0.01)
    for block in (128, 16, 7):
        codes, _, _ = gptq(w, s, 3, act_order=False, damp=0.01, block=block)
        assert (codes != ref).float().mean() < 0.01  # float32 vs float64: a rare tie may flip


@pytest.mark.parametrize("method", ["gptq", "quantease"])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_sigma_gives_rtn(method, group_size, act_order):
    w, _ = make_layer(8, 48)
    s = torch.eye(48)
    for clip in (False, True):
        ref = quantize_weight(w, s, bits=3, method="rtn", group_size=group_size, clip=clip)
        # with the grid held fixed (no refit, one round) CD under Sigma = I is plain rounding
        fixed = dict(refit=False, rounds=1) if method == "quantease" else {}
        q = quantize_weight(w, s, bits=3, method=method, group_size=group_size, act_order=act_order, clip=clip,
                            **fixed)
        assert torch.equal(q.codes, ref.codes)
        assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero, ref.zero)
        if method == "quantease":  # the refitted grid (least squares for the codes) can only do better
            q = quantize_weight(w, s, bits=3, method=method, group_size=group_size, act_order=act_order, clip=clip)
            assert f_of(w, q.dequantize(), s) <= f_of(w, ref.dequantize(), s) * (1 + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 20])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_codes_in_range(bits, group_size, act_order):
    w, s = make_layer(16, 60, seed=bits)
    q = quantize_weight(w, s, bits=bits, method="gptq", group_size=group_size, act_order=act_order)
    r = quantize_weight(w, s, bits=bits, method="rtn", group_size=group_size)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** bits - 1
    assert q.scale.shape == (16, 1 if group_size == -1 else -(-60 // group_size))
    assert f_of(w, q.dequantize(), s) < f_of(w, r.dequantize(), s)
    assert q.info["rel_error"] == pytest.approx(f_of(w, q.dequantize(), s) / f_of(w, 0 * w, s), rel=1e-3)


def test_gptq_act_order_groups_are_static():
    # act-order + groups: the grid of each group is the min-max grid of the original W (no g_idx)
    w, s = make_layer(8, 64, seed=2)
    q = quantize_weight(w, s, bits=3, method="gptq", group_size=16, act_order=True, clip=False)
    scale, zero = grid.fit(w, 3, 16)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)


def test_rtn_matches_grid():
    w, s = make_layer(8, 40)
    codes, scale, zero = rtn(w, 4, 8, sym=True)
    q = quantize_weight(w, s, bits=4, method="rtn", group_size=8, sym=True)
    assert torch.equal(q.codes, codes.to(torch.uint8)) and (q.zero == 8).all()


def test_gptq_dead_columns():
    w, s = make_layer(8, 32)
    s[:, 3] = 0
    s[3, :] = 0
    q = quantize_weight(w, s, bits=3, method="gptq")
    assert torch.isfinite(q.dequantize()).all()
    r = quantize_weight(w, s, bits=3, method="rtn", clip=True)
    assert torch.equal(q.scale, r.scale)
    assert torch.equal(q.codes[:, 3], r.codes[:, 3])  # nothing flows into or out of a dead column


GPTQ_TRITON_CHECK = """
import sys, torch
sys.path.insert(0, "tests")
from qhelpers import make_layer
from quantease.quantize import grid, gptq_triton
from quantease.quantize.gptq import columns, hinv_cholesky
# odd rows (a partial BM tile), K past a whole block and a partial one, per channel and act-order groups, 2-4 bits
for n, k, gs, bits, seed in ((21, 150, -1, 3, 8), (37, 300, 64, 4, 9), (5, 129, -1, 2, 10), (16, 128, 32, 3, 11)):
    w, s = make_layer(n, k, seed=seed, tokens=512)
    perm = torch.argsort(torch.diagonal(s), descending=True)
    scale, zero = grid.fit(w, bits, gs)
    cs, cz = grid.expand(scale, k, gs)[:, perm], grid.expand(zero, k, gs)[:, perm]
    wp = w[:, perm].contiguous()
    u = hinv_cholesky(s[perm][:, perm], 0.01)
    keep = wp.clone()
    a = columns(wp.clone(), u, cs, cz, bits)
    b = gptq_triton.columns(wp, u, cs, cz, bits)
    assert torch.equal(a, b), (n, k, gs, bits, int((a != b).sum()))
    assert torch.equal(wp, keep), "the kernel's form must leave w to the torch fallback untouched"
print("ok")
"""


def test_gptq_triton_columns_match_torch_in_interpreter():
    """The CUDA kernel's arithmetic, run by Triton's CPU interpreter, gives the torch loop's codes exactly."""
    pytest.importorskip("triton")
    run_interpreted(GPTQ_TRITON_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton column sweep runs on CUDA tensors")
@pytest.mark.parametrize("group_size", [-1, 128])
def test_gptq_on_cuda_kernel_equals_torch_loop(group_size, monkeypatch):
    # on the GPU the kernel may fuse the update's multiply-add (one rounding less): a code that flips there moves
    # the rest of its row's compensation, so the codes agree almost everywhere and f to ~1e-3, not bit for bit
    w, s = make_layer(300, 1000, seed=3, tokens=4096)
    w, s = w.cuda(), s.cuda()
    codes, scale, zero = gptq(w, s, 3, group_size, act_order=True, clip=True)
    monkeypatch.setenv("QUANTEASE_NO_TRITON", "1")
    codes_t, scale_t, zero_t = gptq(w, s, 3, group_size, act_order=True, clip=True)
    assert torch.equal(scale, scale_t) and torch.equal(zero, zero_t)
    assert (codes != codes_t).float().mean() < 1e-2
    f = f_of(w, grid.dequantize_tensor(codes, scale, zero, group_size), s)
    f_t = f_of(w, grid.dequantize_tensor(codes_t, scale_t, zero_t, group_size), s)
    assert abs(f - f_t) <= 1e-2 * f_t


def test_triton_failure_falls_back_to_torch_once(monkeypatch):
    from quantease.quantize import cd_triton

    class OnCuda:
        is_cuda = True

    calls = []

    def kernel(t):
        calls.append("kernel")
        raise RuntimeError("PTX compile failed")

    def fallback(t):
        calls.append("torch")
        return "torch result"

    monkeypatch.setattr(cd_triton, "available", lambda: True)
    monkeypatch.setattr(cd_triton, "_broken", [])
    with pytest.warns(UserWarning, match="Triton kernels unavailable .*PTX compile failed.*using torch"):
        assert cd_triton.run(kernel, fallback, OnCuda()) == "torch result"
    assert cd_triton.run(kernel, fallback, OnCuda()) == "torch result"  # no second try
    assert calls == ["kernel", "torch", "torch"]

    def oom(t):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cd_triton, "_broken", [])
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not the kernel's fault: the pipeline reports it
        cd_triton.run(oom, fallback, OnCuda())
    assert not cd_triton._broken
