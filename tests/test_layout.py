import pytest
import torch

from quantease.format import layout


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100, 256])
def test_pack_roundtrip(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2 ** bits, (5, k), generator=g).to(torch.uint8)
    packed = layout.pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, layout.padded_k(k) // 32 * bits)
    assert torch.equal(layout.unpack_codes(packed, bits, k), codes)


def test_pack_bit_positions_3bit():
    # code 7 at column 0 and code 4 at column 17: the documented planes and offsets
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 0], codes[0, 17] = 7, 4
    w = layout.pack_codes(codes, 3)[0].tolist()
    assert w == [0b11, 0, (1 << 0) | (1 << 17)]


def test_bad_bits():
    with pytest.raises(ValueError, match="bits=5"):
        layout.pack_codes(torch.zeros(1, 32, dtype=torch.uint8), 5)


def test_slice_outliers_rebases_and_pads():
    idx = torch.tensor([[1, 5, 9, 9], [0, 2, 3, 12]], dtype=torch.int16)
    val = torch.tensor([[1., 2., 3., 0.], [4., 5., 6., 7.]], dtype=torch.float16)
    new_idx, new_val = layout.slice_outliers(idx, val, 4, 12)
    assert new_idx.tolist() == [[1, 5, 5, 5], [0, 0, 0, 0]]
    assert new_val.tolist() == [[2., 3., 0., 0.], [0., 0., 0., 0.]]


def test_slice_outliers_matches_dense():
    g = torch.Generator().manual_seed(0)
    n, k, r = 7, 64, 5
    idx = torch.sort(torch.stack([torch.randperm(k, generator=g)[:r] for _ in range(n)]), dim=1).values
    val = torch.randn(n, r, generator=g).half()
    dense = torch.zeros(n, k).scatter_add_(1, idx, val.float())
    for start, end in [(0, 32), (32, 64), (16, 48)]:
        i, v = layout.slice_outliers(idx.to(torch.int16), val, start, end)
        part = torch.zeros(n, end - start).scatter_add_(1, i.long(), v.float())
        assert torch.equal(part, dense[:, start:end])
        assert (i[:, 1:] >= i[:, :-1]).all()
