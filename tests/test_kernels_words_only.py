"""The half2 words alone (prepare.drop_planes: what prepare_weights keeps on CUDA for 3-bit per channel / groups of a
multiple of 256): kernels/dequant_half2.py against the planes' dequant, and every M through the dispatcher against
the float64 reference, outputs NaN-poisoned.  CPU: TRITON_INTERPRET=1 (tests/test_kernels.py's import); prepare
builds no words there, so the tests add them and drop the planes the way prepare_weights does on CUDA.
"""
import pytest
import torch

# first (it sets TRITON_INTERPRET)
from test_kernels import DEVICE, check, duplicate_and_padded_slots, make_weight, needs_triton, reference64
from quantease.errors import QuantEaseError
from quantease.format import layout
from quantease.kernels import dequantize_prepared, gemv_half2, ops, prepare_weights, qlinear_prepared
from quantease.kernels.prepare import drop_planes, keep_planes

MS = (1, 3, 5, 16, 30, 65, 100, 250)
GRIDS = ((-1, True), (-1, False), (256, False), (512, True))


def words_only(w, group_size, k):
    p = drop_planes(gemv_half2.add_layout(prepare_weights(*w, 3, group_size, k, planes="keep")))
    assert p["plane0"] is None and p["plane1"] is None and p["words"] is not None
    return p


@needs_triton
@pytest.mark.parametrize("group_size,sym", GRIDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_dequant_matches_the_planes(group_size, sym, dtype):
    """Same values as gemm.dequantize on the planes (one rounding of s * (c - z)), outliers included, odd N / K."""
    from quantease.kernels import dequant_half2, gemm

    n, k = 37, 1100  # a partial row tile, a partial last block
    w = make_weight(n, k, 3, group_size, 0.03, sym, 7)
    planes = gemv_half2.add_layout(prepare_weights(*w, 3, group_size, k, planes="keep"))
    want = gemm.dequantize(planes, dtype, outliers=True)
    got = dequant_half2.dequantize_half2(drop_planes(dict(planes)), dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    codes_only = dequant_half2.dequantize_half2(drop_planes(dict(planes)), dtype, outliers=False)
    torch.testing.assert_close(codes_only, gemm.dequantize(planes, dtype), rtol=0, atol=0)
    if dtype != torch.bfloat16:  # (the CPU interpreter's bf16 conversion is its own: against the planes only)
        dense = layout.dequantize_packed(*w[:3], None, None, 3, group_size, k)
        torch.testing.assert_close(codes_only, dense.to(dtype), rtol=0, atol=0)


@needs_triton
def test_dequant_outlier_duplicates_and_padding():
    from quantease.kernels import dequant_half2

    n, k = 21, 700
    qweight, scales, zeros = make_weight(n, k, 3, -1, 0.0, False, 6)[:3]
    idx, val = duplicate_and_padded_slots(n, k, 40)  # R = 40: three chunks of dequant_half2.BR slots
    p = words_only((qweight, scales, zeros, idx, val), -1, k)
    dense = layout.dequantize_packed(qweight, scales, zeros, None, None, 3, -1, k)
    want = dense.to(torch.float16).double().scatter_add(1, idx.long(), val.double())
    torch.testing.assert_close(dequant_half2.dequantize_half2(p, torch.float16).double(), want, rtol=0, atol=4e-3)


@needs_triton
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_every_m_through_the_dispatcher(m, dtype):
    """GEMV (M = 1), gemm_half2 (2..MAX_M), dequant_half2 + matmul (above, and fp32 x at every M)."""
    group_size, sym = GRIDS[m % len(GRIDS)]
    n, k = 40, 600
    w = make_weight(n, k, 3, group_size, 0.02, sym, m)
    p = words_only(w, group_size, k)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if m % 2 else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = qlinear_prepared(x, p, b, backend="triton", out=out)
    assert y.data_ptr() == out.data_ptr()
    check(y, reference64(x, w, 3, group_size, k, b), dtype)


def test_torch_backend_and_custom_op_read_the_words():
    w = make_weight(24, 300, 3, -1, 0.05, False, 3, device="cpu")
    p = words_only(w, -1, 300)
    torch.testing.assert_close(dequantize_prepared(p), layout.dequantize_packed(*w, 3, -1, 300), rtol=0, atol=0)
    x = torch.randn(2, 3, 300).half()
    y = qlinear_prepared(x, p, None, backend="torch")
    check(y.reshape(6, 24), reference64(x.reshape(6, 300), w, 3, -1, 300, None), torch.float16)
    y_op = qlinear_prepared(x, p)  # torch.ops.quantease.qlinear with plane0 = plane1 = None (auto: CPU -> torch)
    assert y_op.shape == (2, 3, 24) and torch.equal(y_op, y)
    torch.library.opcheck(torch.ops.quantease.qlinear, (x.reshape(6, 300), *(p.get(t) for t in ops.TENSORS), None,
                                                       3, -1, 300))


def test_which_layouts_drop_the_planes():
    def dropped(group_size, bits=3):
        w = make_weight(8, 512, bits, group_size, 0.0, False, 1, device="cpu")
        p = prepare_weights(*w, bits, group_size, 512, planes="keep")
        if bits == 3:
            gemv_half2.add_layout(p)
        return drop_planes(p)["plane0"] is None

    assert dropped(-1) and dropped(256) and dropped(512)
    assert not dropped(128) and not dropped(64) and not dropped(-1, bits=4)  # Q < 8 words / no words: planes stay
    w = make_weight(8, 512, 3, -1, 0.0, False, 1, device="cpu")
    assert prepare_weights(*w, 3, -1, 512)["plane0"] is not None  # CPU: no words are built, the planes stay


def test_prepare_on_cuda_builds_the_words_from_the_codes(monkeypatch):
    """prepare_weights' CUDA branch (taken here on the CPU): the words from the codes directly, the planes never
    built where the words cover every path, both with planes="keep"; the same tensors as add_layout on the planes."""
    from quantease.kernels import prepare

    for group_size, zeros_dtype in ((-1, torch.int16), (256, torch.int16), (128, torch.uint8)):
        w = make_weight(24, 700, 3, group_size, 0.02, False, 4, device="cpu")
        monkeypatch.setattr(prepare, "_builds_words", lambda device: False)
        want = gemv_half2.add_layout(prepare_weights(*w, 3, group_size, 700))  # from the planes (the CPU path)
        monkeypatch.setattr(prepare, "_builds_words", lambda device: True)
        for planes in ("drop", "keep"):
            p = prepare_weights(*w, 3, group_size, 700, planes=planes)
            assert torch.equal(p["words"], want["words"]) and p["zeros"].dtype == zeros_dtype
            assert torch.equal(p["zeros"], want["zeros"])
            if planes == "drop" and group_size != 128:
                assert p["plane0"] is None and p["plane1"] is None
            else:  # kept, or needed (Q = 4 words at g128: gemm_half2 / dequant_half2 do not read them)
                assert torch.equal(p["plane0"], want["plane0"]) and torch.equal(p["plane1"], want["plane1"])


def test_planes_option(monkeypatch):
    assert not keep_planes() and keep_planes("keep") and not keep_planes("drop")
    monkeypatch.setenv("QUANTEASE_PLANES", "keep")
    assert keep_planes()
    monkeypatch.setenv("QUANTEASE_PLANES", "both")
    with pytest.raises(QuantEaseError, match="QUANTEASE_PLANES.*one of"):
        keep_planes()


def test_dequant_without_words_raises_one_clear_error():
    from quantease.kernels import dequant_half2

    w = make_weight(8, 256, 3, 128, 0.0, False, 2, device="cpu")
    p = gemv_half2.add_layout(prepare_weights(*w, 3, 128, 256))
    with pytest.raises(QuantEaseError, match="group_size=128"):
        dequant_half2.dequantize_half2(p, torch.float16)
