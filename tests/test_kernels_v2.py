"""GEMV v2 (kernels/gemv_half2.py, half2 unpack + HFMA2) against the float64 reference.

CPU: the kernel runs under TRITON_INTERPRET=1 with its 16-bit pair arithmetic emulated lane by lane (one round
per operation, as the PTX does); on a GPU the same cases run the inline-PTX path.  Every run writes into a
NaN-poisoned output.  Shapes are odd on purpose: partial row tiles, partial 32 Q-column blocks, a partial last
K step, an odd K (the int32 pair loads need a padded copy of x there).
"""
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported

from test_kernels import DEVICE, check, make_weight, needs_triton, reference64  # noqa: E402

from quantease.errors import QuantEaseError  # noqa: E402
from quantease.format import layout  # noqa: E402
from quantease.kernels import gemv_half2, prepare_weights, qlinear_prepared  # noqa: E402
from quantease.kernels.prepare import codes_from_half2, half2_from_prepared, prepare_half2  # noqa: E402


pytestmark = pytest.mark.usefixtures("keep_planes")  # plane kernels called directly (conftest.py)



def run_v2(n, k, group_size, fraction, sym, m, dtype, bias, seed=0, config=None, prefetch=True):
    w = make_weight(n, k, 3, group_size, fraction, sym, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    p = prepare_half2(*w, 3, group_size, k)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = gemv_half2.qgemv_half2(x, p, b, out, config=config, prefetch=prefetch)
    assert y.data_ptr() == out.data_ptr()
    check(y, reference64(x, w, 3, group_size, k, b), dtype)


# M x dtype, cycling shape / grid / outliers / bias so that each value of each is hit.  Grids: per channel
# (Q = 4), groups of 128 (Q = 4, partial last group), 64 (Q = 2) and 32 (Q = 1); symmetric and asymmetric.
SHAPES = ((33, 160), (40, 200), (17, 320))  # K covers >= one whole block (its spare-bit pairs are last)
GRIDS = ((-1, True), (128, False), (64, True), (32, False), (-1, False))
CASES = [(*SHAPES[i % 3], *GRIDS[i % 5], (0.0, 0.05, 0.02)[i % 3], m, dtype, i % 2 == 0)
         for i, (m, dtype) in enumerate(itertools.product((1, 3, 5, 16), (torch.float16, torch.bfloat16)))]


@needs_triton
@pytest.mark.parametrize("n,k,group_size,sym,fraction,m,dtype,bias", CASES)
def test_half2_matches_reference(n, k, group_size, sym, fraction, m, dtype, bias):
    run_v2(n, k, group_size, fraction, sym, m, dtype, bias)


@needs_triton
@pytest.mark.parametrize("prefetch", (True, False))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_several_steps_and_a_partial_tail(prefetch, dtype):
    # K = 1000: 8 blocks of 128 (the last partial), 2 blocks per step -> 3 unmasked steps + 1 masked tail
    run_v2(20, 1000, -1, 0.01, False, 1, dtype, True, seed=3, config=(8, 2, 2), prefetch=prefetch)


@needs_triton
@pytest.mark.parametrize("k,m", ((1000, 1), (300, 2), (100, 1)))  # 3 / 1 / 0 unmasked steps before the tail
def test_prefetch_two_steps_ahead(k, m):
    run_v2(20, k, -1, 0.01, True, m, torch.float16, False, seed=k, config=(8, 2, 2, 3, 2))


@needs_triton
@pytest.mark.parametrize("k,m,group_size,config,kw", (
    (1000, 1, -1, (8, 2, 1, 3, 1, 2, True), {}),  # hint 2 steps ahead + pinned loads (config), masked tail
    (1000, 2, 128, (8, 2, 2, 3, 2), {"lead": 3, "level": 1, "pin": True}),  # depth 2, L1 hints, groups
    (300, 1, -1, (8, 1, 1), {"lead": 1, "cg": True, "xhint": True}),  # 2 whole steps: no hint for step 2
    (1000, 3, 64, (8, 2, 1, 3, 1, 0, True, False, True), {}),  # pin + x hints (config) for BM = 4 rows, Q = 2
))
def test_cache_hints_and_pinned_loads(k, m, group_size, config, kw):
    # on the CPU interpreter the hints are off (CUDA only: results never depend on them) and the barrier is a no-op
    w = make_weight(24, k, 3, group_size, 0.02, group_size == -1, k + m)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).half().to(DEVICE)
    p = prepare_half2(*w, 3, group_size, k)
    out = torch.full((m, 24), float("nan"), dtype=torch.float16, device=DEVICE)
    y = gemv_half2.qgemv_half2(x, p, None, out, config=config, **kw)
    check(y, reference64(x, w, 3, group_size, k, None), torch.float16)


@needs_triton
@pytest.mark.parametrize("k,m,group_size,dtype,config", (
    (1000, 1, -1, torch.float16, (8, 2, 1, 3, 0, 0, False, False, False, 3)),  # 3 whole steps + masked tail
    (1000, 2, 128, torch.bfloat16, (8, 1, 2, 3, 0, 0, False, False, False, 4)),  # groups, depth > whole steps
    (300, 3, -1, torch.float16, (8, 1, 1, 3, 0, 0, False, False, False, 2)),  # BM = 4 rows, asymmetric
    (100, 1, 64, torch.float16, (8, 2, 1, 3, 0, 0, False, False, False, 3)),  # no whole step: tail only, Q = 2
))
def test_software_pipelined_loop(k, m, group_size, dtype, config):
    # pipe > 1: triton pipelines the K loop's loads (cp.async on a GPU; the interpreter runs the plain loop)
    w = make_weight(24, k, 3, group_size, 0.02, m == 1, k + m)
    g = torch.Generator().manual_seed(k + 1)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    p = prepare_half2(*w, 3, group_size, k)
    out = torch.full((m, 24), float("nan"), dtype=dtype, device=DEVICE)
    y = gemv_half2.qgemv_half2(x, p, None, out, config=config)
    check(y, reference64(x, w, 3, group_size, k, None), dtype)


def test_pipe_needs_prefetch_zero():
    w = make_weight(8, 96, 3, -1, 0.0, True, 8, device="cpu")
    for kw in ({"pipe": 3}, {"pipe": 0, "prefetch": 0}):  # prefetch 1 (the default) and pipe 3; pipe 0
        with pytest.raises(QuantEaseError, match="pipe="):
            gemv_half2.qgemv_half2(torch.randn(1, 96).half(), prepare_half2(*w, 3, -1, 96), None,
                                   torch.empty(1, 8).half(), config=(8, 2, 1), **kw)


def test_cache_hint_arguments_checked():
    w = make_weight(8, 96, 3, -1, 0.0, True, 8, device="cpu")
    for kw in ({"lead": -1}, {"lead": 1, "level": 3}):
        with pytest.raises(QuantEaseError, match="cache hint"):
            gemv_half2.qgemv_half2(torch.randn(1, 96).half(), prepare_half2(*w, 3, -1, 96), None,
                                   torch.empty(1, 8).half(), **kw)


@needs_triton
@pytest.mark.parametrize("early", (True, False))
@pytest.mark.parametrize("m,fraction", ((1, 0.05), (3, 0.02)))  # 50 slots: the early first 32 + one more chunk
def test_outlier_slots_before_or_after_the_loop(early, m, fraction):
    w = make_weight(24, 1000, 3, -1, fraction, False, 11)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(m, 1000, generator=g).half().to(DEVICE)
    p = prepare_half2(*w, 3, -1, 1000)
    assert p["outlier_idx"].shape[1] == (50 if fraction == 0.05 else 20)
    out = torch.full((m, 24), float("nan"), dtype=torch.float16, device=DEVICE)
    y = gemv_half2.qgemv_half2(x, p, None, out, config=(8, 4, 1), early_outliers=early)
    check(y, reference64(x, w, 3, -1, 1000, None), torch.float16)


@needs_triton
@pytest.mark.parametrize("config", ((8, 4, 1), (8, 1, 1), (32, 2, 1)))
@pytest.mark.parametrize("m,dtype", ((1, torch.float16), (1, torch.bfloat16), (3, torch.float16)))
def test_outlier_slots_inside_the_loop(config, m, dtype):
    """loop_outliers at M = 1, 50 slots a row, K = 1000 (3 whole blocks of 256): no whole step at 4 blocks a step
    (all after the loop), 3 steps of 32 slots (all in the loop), 1 step (32 in it, 18 after); M = 3 ignores it."""
    w = make_weight(40, 1000, 3, -1, 0.05, False, 13)
    x = torch.randn(m, 1000, generator=torch.Generator().manual_seed(14)).to(dtype).to(DEVICE)
    p = prepare_half2(*w, 3, -1, 1000)
    out = torch.full((m, 40), float("nan"), dtype=dtype, device=DEVICE)
    y = gemv_half2.qgemv_half2(x, p, None, out, config=config, loop_outliers=True)
    check(y, reference64(x, w, 3, -1, 1000, None), dtype)
    if m == 1 and config == (8, 1, 1):  # 4 slots a step given: 12 in the loop, 38 after
        y = gemv_half2.qgemv_half2(x, p, None, torch.full_like(out, float("nan")), config=config, loop_outliers=4)
        check(y, reference64(x, w, 3, -1, 1000, None), dtype)
    for bad in (3, -2):  # checked at any M
        with pytest.raises(QuantEaseError, match="power of 2"):
            gemv_half2.qgemv_half2(x, p, None, out, config=config, loop_outliers=bad)


@needs_triton
@pytest.mark.parametrize("config, loop", (((8, 1, 1), False), ((32, 1, 1), True), ((8, 1, 4), True)))
def test_loop_outliers_default_per_config(config, loop, monkeypatch):
    """loop_outliers=None: in the loop except on 1-warp configs with early slots (H100: loses there), the same y."""
    seen = {}
    real = gemv_half2.qgemv_half2_kernel

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.update(kw) or real[grid](*a, **kw)

    monkeypatch.setattr(gemv_half2, "qgemv_half2_kernel", Spy())
    w = make_weight(40, 1000, 3, -1, 0.05, False, 13)
    x = torch.randn(1, 1000, generator=torch.Generator().manual_seed(14)).half().to(DEVICE)
    out = torch.full((1, 40), float("nan"), dtype=torch.float16, device=DEVICE)
    y = gemv_half2.qgemv_half2(x, prepare_half2(*w, 3, -1, 1000), None, out, config=config)
    assert (seen["ILR"] > 0) == loop and seen["EARLY"] == (not loop and config[0] * 32 <= 512 * config[2])
    check(y, reference64(x, w, 3, -1, 1000, None), torch.float16)


def test_config_table_by_shape():
    def pick(m, n=None, k=None, q=4):  # the table as measured, at q = 4 (blocks of 128 columns)
        return gemv_half2.pick_config(m, n, k, q)
    assert pick(1, 8192, 8192) == (8, 16, 1) and pick(1, 4096, 14336) == (8, 16, 1)
    assert pick(1, 28672, 8192) == (32, 4, 1) and pick(1, 28672, 4096) == (32, 4, 1)
    assert pick(1, 8192, 28672) == (8, 16, 1)  # long N only pays with K <= 8192
    assert pick(1, 4096, 11008) == (8, 32, 4)  # 86 blocks of 128: ragged
    # ragged counts blocks of 32 q columns: K = 4000 is 32 blocks of 128 (2 whole steps), 125 blocks of 32
    assert pick(1, 4096, 4000) == (8, 16, 1) and pick(1, 4096, 4000, q=1) == (8, 32, 4)
    assert pick(2, 8192, 8192) == gemv_half2.M2_PIPELINED == pick(2, 4096, 14336)
    assert pick(2, 11008, 4096) == (16, 4, 1)
    assert pick(2, 4096, 11008) == (32, 16, 8)
    # q = 8 (the default: per channel, groups of 256 k): half the blocks of 256 columns per step, the same
    # words per role and row; ragged still means K not a whole number of 2048-column steps
    for m, n, k in ((1, 8192, 8192), (1, 28672, 8192), (1, 4096, 11008), (1, 4096, 4000), (2, 8192, 8192),
                    (2, 11008, 4096), (2, 4096, 11008)):
        c4, c8 = pick(m, n, k), gemv_half2.pick_config(m, n, k)
        assert c8 == (c4[0], c4[1] // 2) + c4[2:], (m, n, k)
    assert gemv_half2.pick_config(1) == gemv_half2.pick_config(1, 8192, 8192)
    with pytest.raises(QuantEaseError, match="prefetch depth"):
        w = make_weight(8, 96, 3, -1, 0.0, True, 8, device="cpu")
        gemv_half2.qgemv_half2(torch.randn(1, 96).half(), prepare_half2(*w, 3, -1, 96), None,
                               torch.empty(1, 8).half(), prefetch=3)


@needs_triton
@pytest.mark.parametrize("group_size,m,dtype", ((256, 1, torch.float16), (512, 3, torch.bfloat16)))
def test_groups_of_several_blocks(group_size, m, dtype):  # 2 / 4 blocks of 128 columns per group
    run_v2(24, 600, group_size, 0.02, group_size == 512, m, dtype, False, seed=group_size, config=(8, 2, 2))


@needs_triton
@pytest.mark.parametrize("m", (1, 2))
def test_odd_k_and_strided_x(m):
    run_v2(24, 97, -1, 0.03, True, m, torch.float16, False, seed=4)  # odd K: x copied with a zero column
    w = make_weight(24, 128, 3, 32, 0.0, False, 5)
    p = prepare_half2(*w, 3, 32, 128)
    big = torch.randn(m, 131).half().to(DEVICE)
    x = big[:, 1:129]  # odd row stride, 2-byte aligned base
    out = torch.full((m, 24), float("nan"), dtype=torch.float16, device=DEVICE)
    check(gemv_half2.qgemv_half2(x, p, None, out), reference64(x, w, 3, 32, 128, None), torch.float16)


def test_half2_layout_round_trips():
    for group_size, k in ((-1, 70), (128, 300), (64, 64), (32, 33)):
        w = make_weight(9, k, 3, group_size, 0.05, False, 7, device="cpu")
        p = prepare_half2(*w, 3, group_size, k)
        assert p["q"] == {-1: 8, 128: 4, 64: 2, 32: 1}[group_size]
        assert p["words"].shape[1] % (3 * p["q"]) == 0 and p["words"].dtype == torch.int32
        codes = layout.unpack_codes(w[0], 3, k).to(torch.int32)
        assert torch.equal(codes_from_half2(p["words"], p["q"], k), codes)
        p1 = prepare_weights(*w, 3, group_size, k)
        assert torch.equal(half2_from_prepared(p1)["words"], p["words"])


def test_unsupported_inputs_raise_one_clear_error():
    w = make_weight(8, 96, 3, -1, 0.0, True, 8, device="cpu")
    p = prepare_half2(*w, 3, -1, 96)
    for bits in (2, 4, 8):
        wb = make_weight(8, 96, bits, -1, 0.0, True, 8, device="cpu")
        with pytest.raises(QuantEaseError, match=f"bits={bits}"):
            prepare_half2(*wb, bits, -1, 96)
    w50 = make_weight(8, 100, 3, 50, 0.0, False, 8, device="cpu")
    with pytest.raises(QuantEaseError, match="group_size=50"):
        prepare_half2(*w50, 3, 50, 100)
    with pytest.raises(QuantEaseError, match="float32"):
        gemv_half2.qgemv_half2(torch.randn(1, 96), p, None, torch.empty(1, 8))
    with pytest.raises(QuantEaseError, match="prepare_half2"):
        gemv_half2.qgemv_half2(torch.randn(1, 96).half(), prepare_weights(*w, 3, -1, 96), None,
                               torch.empty(1, 8).half())


@needs_triton
def test_dispatch_env(monkeypatch):
    """half2 is the default GEMV where it applies (QUANTEASE_GEMV unset or "half2"); other bits, odd groups and fp32
    x stay on v1, and QUANTEASE_GEMV=v1 sends everything there; all match the reference."""
    calls = []
    real = gemv_half2.qgemv_half2

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gemv_half2, "qgemv_half2", spy)
    monkeypatch.delenv(gemv_half2.GEMV_ENV, raising=False)

    def one(bits, group_size, dtype, k=96, m=1):
        w = make_weight(16, k, bits, group_size, 0.05, False, 9)
        p = prepare_weights(*w, bits, group_size, k)
        x = torch.randn(m, k).to(dtype).to(DEVICE)
        out = torch.full((m, 16), float("nan"), dtype=dtype, device=DEVICE)
        check(qlinear_prepared(x, p, None, backend="triton", out=out), reference64(x, w, bits, group_size, k, None),
              dtype)
        return len(calls)

    assert one(3, -1, torch.float16) == 1  # default: half2
    assert one(3, 32, torch.bfloat16, m=2) == 2
    assert one(4, -1, torch.float16) == 2  # other bits: v1
    assert one(3, 50, torch.float16, k=100) == 2  # groups not a multiple of 32: v1
    assert one(3, -1, torch.float32) == 2  # fp32 activations: v1
    monkeypatch.setenv(gemv_half2.GEMV_ENV, "v1")
    assert one(3, -1, torch.float16) == 2
    monkeypatch.setenv(gemv_half2.GEMV_ENV, "v3")
    with pytest.raises(QuantEaseError, match="QUANTEASE_GEMV"):
        one(3, -1, torch.float16)


@needs_triton
def test_layout_added_at_load_time_is_used_as_is():
    """add_layout puts the half2 words in prepare_weights' dict: the dispatcher then reads them and builds no
    hidden copy; without them it builds one on first use (cached on plane0)."""
    w = make_weight(16, 256, 3, -1, 0.02, True, 13)
    x = torch.randn(1, 256).half().to(DEVICE)
    ref = reference64(x, w, 3, -1, 256, None)
    p = gemv_half2.add_layout(prepare_weights(*w, 3, -1, 256))
    assert torch.equal(p["words"], prepare_half2(*w, 3, -1, 256)["words"])
    out = torch.full((1, 16), float("nan"), dtype=torch.float16, device=DEVICE)
    check(qlinear_prepared(x, p, None, backend="triton", out=out), ref, torch.float16)
    assert not hasattr(p["plane0"], "_quantease_half2")
    p.pop("words")
    out = torch.full((1, 16), float("nan"), dtype=torch.float16, device=DEVICE)
    check(qlinear_prepared(x, p, None, backend="triton", out=out), ref, torch.float16)
    assert hasattr(p["plane0"], "_quantease_half2")
    w4 = make_weight(16, 256, 4, -1, 0.0, True, 13)
    assert gemv_half2.add_layout(prepare_weights(*w4, 4, -1, 256))["words"] is None
