"""Triton GEMV/GEMM (+ fused outliers) against the torch reference.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1 (set here before the kernels are imported;
scripts/test.sh sets it too).  On a GPU the same file runs them compiled; QUANTEASE_KERNEL_TEST_BIG=1 adds
LLM-sized shapes there.  Every Triton run writes into a NaN-poisoned output.
"""
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported

from quantease.errors import QuantEaseError  # noqa: E402
from quantease.format import layout  # noqa: E402
from quantease.kernels import (dequantize_prepared, prepare_weights, qlinear, qlinear_prepared,  # noqa: E402
                               qlinear_reference)
from quantease.kernels import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="no CUDA and TRITON_INTERPRET is not 1")
BIG = os.environ.get("QUANTEASE_KERNEL_TEST_BIG") == "1" and DEVICE == "cuda"

MS = (1, 3, 5, 16, 30, 65, 100, 250)
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}


def make_weight(n, k, bits, group_size, fraction, sym, seed, device=DEVICE):
    """Random packed weight; outlier rows keep ELL padding (zero values repeating the last index)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
    qweight = layout.pack_codes(codes, bits)
    ng = layout.num_groups(k, group_size)
    scales = (torch.rand(n, ng, generator=g) * 0.02 + 0.005).half()
    zeros = None if sym else torch.randint(0, 2 ** bits, (n, ng), generator=g, dtype=torch.uint8)
    r = layout.outlier_slots(k, fraction)
    idx = val = None
    if r:
        cols = torch.sort(torch.rand(n, k, generator=g).argsort(1)[:, :r], 1).values
        val = torch.randn(n, r, generator=g).half()
        used = torch.randint(0, r + 1, (n,), generator=g)  # some rows use fewer slots than R
        pad = torch.arange(r)[None, :] >= used[:, None]
        last = torch.where(pad, torch.zeros_like(cols), cols).amax(1, keepdim=True)
        cols = torch.where(pad, last, cols)
        val = torch.where(pad, torch.zeros_like(val), val)
        idx = cols.to(layout.index_dtype(k))
    move = (lambda t: None if t is None else t.to(device))
    return tuple(map(move, (qweight, scales, zeros, idx, val)))


def duplicate_and_padded_slots(n, k, r, seed=5):
    """ELL outliers (idx int16, val fp16 on DEVICE) [n, r] with a real duplicate index in every row (both values
    must land) and, in every third row, padding (value 0) repeating the last index from slot 25 on."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randint(0, k, (n, r), generator=g), 1).values
    idx[:, 2] = idx[:, 1]
    val = torch.randn(n, r, generator=g).half()
    val[::3, 25:] = 0
    idx[::3, 25:] = idx[::3, 24:25]
    return idx.to(torch.int16).to(DEVICE), val.to(DEVICE)


def reference64(x, w, bits, group_size, k, bias):
    """Float64 reference (x and the dense weight in float64)."""
    dense = layout.dequantize_packed(*w, bits, group_size, k, dtype=torch.float64)
    y = x.to(torch.float64) @ dense.t()
    return y if bias is None else y + bias.to(torch.float64)


def check(y, ref, dtype):
    assert torch.isfinite(y).all(), "output has NaN/inf: some elements were not written"
    err = ((y.to(torch.float64) - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


def make_case(n, k, bits, group_size, fraction, sym, m, dtype, bias, seed=0):
    """(checkpoint tensors, prepared dict, x, bias or None, NaN-poisoned out) of one kernel test case."""
    w = make_weight(n, k, bits, group_size, fraction, sym, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    return w, prepare_weights(*w, bits, group_size, k), x, b, out


def run_case(n, k, bits, group_size, fraction, sym, m, dtype, bias, seed=0, backend="triton"):
    w, p, x, b, out = make_case(n, k, bits, group_size, fraction, sym, m, dtype, bias, seed)
    y = qlinear_prepared(x, p, b, backend=backend, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    check(y, reference64(x, w, bits, group_size, k, b), dtype)


# every M x dtype, cycling through bits / shape / grid / outliers so that each value of each is hit
SHAPES = ((96, 160), (33, 96), (40, 200))
GRIDS = ((-1, True), (32, False), (64, True), (50, False), (-1, False))
CASES = []
for i, (m, dtype) in enumerate(itertools.product(MS, (torch.float16, torch.bfloat16))):
    n, k = SHAPES[i % 3]
    group_size, sym = GRIDS[i % 5]
    if group_size > 0 and k % group_size and i % 2:
        group_size = 32
    CASES.append((n, k, (3, 2, 4, 3)[i % 4], group_size, (0.0, 0.05, 0.02)[i % 3], sym, m, dtype, i % 2 == 0))


@needs_triton
@pytest.mark.parametrize("n,k,bits,group_size,fraction,sym,m,dtype,bias", CASES)
def test_triton_matches_reference(n, k, bits, group_size, fraction, sym, m, dtype, bias):
    run_case(n, k, bits, group_size, fraction, sym, m, dtype, bias)


@needs_triton
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("m", (1, 65))  # GEMV and GEMM
def test_every_bits_with_outliers_and_groups(bits, m):
    run_case(40, 200, bits, 64, 0.05, False, m, torch.float16, True, seed=bits)


@needs_triton
@pytest.mark.parametrize("m", (2, 30))
def test_float32_activations(m):
    run_case(33, 96, 3, -1, 0.05, True, m, torch.float32, True)


@needs_triton
@pytest.mark.parametrize("m", (1, 4, 8, 9, 16, 17))  # both sides of the GEMV/GEMM switch
def test_dispatch_boundary(m):
    run_case(64, 128, 3, -1, 0.02, True, m, torch.bfloat16, False, seed=m)


@pytest.mark.skipif(not BIG, reason="LLM-sized shapes: set QUANTEASE_KERNEL_TEST_BIG=1 on a GPU")
@pytest.mark.parametrize("n,k", ((4096, 4096), (1024, 11008)))
@pytest.mark.parametrize("m", (1, 5, 16, 100, 250))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_big_shapes(n, k, m, dtype):
    run_case(n, k, 3, -1, 0.01, True, m, dtype, m % 2 == 0)
    run_case(n, k, 3, 128, 0.005, False, m, dtype, False)


def test_prepared_layout_round_trips():
    for bits in (2, 3, 4, 8):
        w = make_weight(17, 70, bits, 32, 0.05, False, bits, device="cpu")
        p = prepare_weights(*w, bits, 32, 70)
        assert p["plane0"].is_contiguous() and (p["plane1"] is not None) == (bits == 3)
        assert torch.equal(dequantize_prepared(p), layout.dequantize_packed(*w, bits, 32, 70))


def test_torch_backend_is_the_reference():
    w = make_weight(33, 96, 3, -1, 0.05, True, 3, device="cpu")
    x = torch.randn(5, 96).half()
    p = prepare_weights(*w, 3, -1, 96)
    want = qlinear_reference(x, *w, None, 3, -1, 96)
    assert torch.equal(qlinear_prepared(x, p, None, backend="torch"), want)
    assert torch.equal(qlinear(x, *w, None, 3, -1, 96), want)  # checkpoint layout, CPU -> reference


@needs_triton
def test_custom_op_and_checkpoint_entry(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    w = make_weight(33, 96, 3, 32, 0.05, False, 4)
    x = torch.randn(2, 3, 96).to(DEVICE).half()
    ref = reference64(x.reshape(-1, 96), w, 3, 32, 96, None).reshape(2, 3, 33)
    p = prepare_weights(*w, 3, 32, 96)
    y = qlinear_prepared(x, p)  # through torch.ops.quantease.qlinear
    assert y.shape == (2, 3, 33)
    check(y, ref, torch.float16)
    check(qlinear(x, *w, None, 3, 32, 96), ref, torch.float16)
    assert qlinear(x, *w, None, 3, 32, 96).shape == (2, 3, 33)


def test_custom_op_opcheck():
    w = make_weight(33, 96, 3, 32, 0.05, False, 5, device="cpu")
    p = prepare_weights(*w, 3, 32, 96)
    x = torch.randn(4, 96).half()
    args = (x, *(p.get(t) for t in ops.TENSORS), torch.randn(33).half(), 3, 32, 96)
    torch.library.opcheck(torch.ops.quantease.qlinear.default, args)


def test_bad_inputs_raise_one_clear_error():
    w = make_weight(33, 96, 3, -1, 0.0, True, 6, device="cpu")
    p = prepare_weights(*w, 3, -1, 96)
    with pytest.raises(QuantEaseError, match="input features"):
        qlinear_prepared(torch.randn(2, 95).half(), p)
    with pytest.raises(QuantEaseError, match="words per row"):
        prepare_weights(*w, 3, -1, 200)
    with pytest.raises(QuantEaseError, match="bits=5"):
        prepare_weights(*w, 5, -1, 96)
    with pytest.raises(QuantEaseError, match="backend"):
        qlinear_prepared(torch.randn(2, 96).half(), p, backend="cuda")
    with pytest.raises(QuantEaseError, match="int8"):
        qlinear_prepared(torch.randn(2, 96).to(torch.int8), p)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and torch.compile of the op need a GPU")
@pytest.mark.parametrize("m", (1, 40))
def test_cuda_graph_and_torch_compile(m):
    w = make_weight(256, 512, 3, -1, 0.01, True, 7)
    p = prepare_weights(*w, 3, -1, 512)
    x = torch.randn(m, 512, device="cuda").half()
    f = torch.compile(lambda x: qlinear_prepared(x, p), fullgraph=True)
    check(f(x), reference64(x, w, 3, -1, 512, None), torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        qlinear_prepared(x, p)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qlinear_prepared(x, p)
    x.copy_(torch.randn(m, 512, device="cuda").half())  # new input, same buffer: the replay must see it
    graph.replay()
    torch.cuda.synchronize()
    check(y, reference64(x, w, 3, -1, 512, None), torch.float16)


@needs_triton
@pytest.mark.parametrize("bits", (3, 4))
@pytest.mark.parametrize("m", (1, 40))
def test_groups_of_whole_blocks(bits, m):  # group_size % 256 == 0: the GEMM's scale-per-block mode
    run_case(24, 600, bits, 256, 0.02, bits == 4, m, torch.float16, False, seed=10 + bits)
    run_case(24, 600, bits, 512, 0.0, bits == 3, m, torch.bfloat16, True, seed=20 + bits)


@needs_triton
@pytest.mark.parametrize("bits,group_size,sym", ((3, -1, True), (3, 64, False), (2, 256, False), (4, -1, False)))
def test_large_m_dequant_path(bits, group_size, sym):  # on CUDA, M > ops.SWAP_MAX_M takes this path
    from quantease.kernels import gemm

    w = make_weight(40, 300, bits, group_size, 0.03, sym, 30 + bits)
    p = prepare_weights(*w, bits, group_size, 300, planes="keep")
    dense = gemm.dequantize(p, torch.float32)
    no_outliers = (*w[:3], None, None)
    assert torch.equal(dense, layout.dequantize_packed(*no_outliers, bits, group_size, 300))
    x = torch.randn(7, 300).to(DEVICE)
    out = torch.full((7, 40), float("nan"), device=DEVICE)
    b = torch.randn(40).to(DEVICE)
    check(gemm.dequant_matmul(x, p, b, out), reference64(x, w, bits, group_size, 300, b), torch.float32)
    for dtype in (torch.float16, torch.bfloat16):  # the outliers scattered into the weight rounded to x's dtype
        xd, bd = x.to(dtype), b.to(dtype)
        out = torch.full((7, 40), float("nan"), device=DEVICE, dtype=dtype)
        check(gemm.dequant_matmul(xd, p, bd, out), reference64(xd, w, bits, group_size, 300, bd), dtype)


@needs_triton
@pytest.mark.parametrize("dtype,blocks,k", ((torch.float32, 1, 700), (torch.float16, 1, 700),
                                            (torch.bfloat16, 1, 700), (torch.float16, 2, 1300),
                                            (torch.float32, 4, 1300)))
def test_dequantize_adds_outliers_duplicates_and_padding(dtype, blocks, k):  # the large-M weight, odd N, K, R
    from quantease.kernels import gemm

    # 700: 3 blocks of 256 columns, 1300: 6 (with 2 / 4 blocks per program the last program is partly past K);
    # R = 40: 3 chunks of gemm.DQ_BR slots, skipped where they cannot reach a program's columns
    n = 37
    qweight, scales, zeros = make_weight(n, k, 3, -1, 0.0, False, 6)[:3]
    idx, val = duplicate_and_padded_slots(n, k, 40)
    p = prepare_weights(qweight, scales, zeros, idx, val, 3, -1, k, planes="keep")
    dense = layout.dequantize_packed(qweight, scales, zeros, None, None, 3, -1, k)
    want = dense.to(dtype).double().scatter_add(1, idx.long(), val.double())  # dense rounded, outliers added
    got = gemm.dequantize(p, dtype, outliers=True, blocks=blocks).double()
    atol = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]  # the sum's one rounding
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    # outliers=False: the codes alone (within one rounding: the interpreter's bf16 conversion is its own)
    torch.testing.assert_close(gemm.dequantize(p, dtype, blocks=blocks).double(), dense.to(dtype).double(), rtol=0,
                               atol=atol)


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gemv_partial_last_step(dtype):  # K % 256 == 0 but blocks % blocks-per-step != 0 (like K = 11008)
    from quantease.kernels import gemv

    w = make_weight(16, 768, 3, -1, 0.01, True, 40)
    p = prepare_weights(*w, 3, -1, 768, planes="keep")
    x = torch.randn(1, 768).to(dtype).to(DEVICE)
    out = torch.full((1, 16), float("nan"), dtype=dtype, device=DEVICE)
    check(gemv.qgemv(x, p, None, out, config=(16, 2, 4, 3)), reference64(x, w, 3, -1, 768, None), dtype)
