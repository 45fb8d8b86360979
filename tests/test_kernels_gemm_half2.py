"""kernels/gemm_half2.py (swap-AB mma.sync GEMM on the half2 words) against the float64 reference, outputs
NaN-poisoned before every run.

CPU: TRITON_INTERPRET=1 (set by tests/test_kernels.py's import), the unpack as plain int16 shifts and masks; CUDA:
the inline-PTX unpack (LOP3 + HSUB2 / bf16 FMA) and split-K atomics.  Shapes are odd on purpose: a partial
weight tile, a partial last 256-column block, M tiles that straddle M.
"""
import itertools

import pytest
import torch

from test_kernels import DEVICE, check, make_weight, needs_triton, reference64  # first: sets TRITON_INTERPRET
from quantease.errors import QuantEaseError
from quantease.kernels import gemm_half2, gemv_half2, ops, prepare_weights, qlinear_prepared

MS = (1, 3, 5, 16, 30, 65, 100, 250)
SHAPES = ((40, 300), (33, 600), (72, 256), (24, 1100))
GRIDS = ((-1, True), (-1, False), (256, False), (512, True), (256, True))


def make(n, k, group_size, fraction, sym, m, dtype, bias, seed=0):
    w = make_weight(n, k, 3, group_size, fraction, sym, seed)
    p = gemv_half2.add_layout(prepare_weights(*w, 3, group_size, k))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    return w, p, x, b, out


def run(n, k, group_size, fraction, sym, m, dtype, bias, seed=0, config=None, gather_x=None):
    w, p, x, b, out = make(n, k, group_size, fraction, sym, m, dtype, bias, seed)
    assert gemm_half2.supports(p, x)
    y = gemm_half2.qgemm_half2(x, p, b, out, config=config, gather_x=gather_x)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    check(y, reference64(x, w, 3, group_size, k, b), dtype)


# every M x dtype with the table's config, cycling shape / grid / outliers / bias
CASES = [(*SHAPES[i % 4], *GRIDS[i % 5], (0.0, 0.02, 0.05)[i % 3], m, dtype, i % 2 == 0)
         for i, (m, dtype) in enumerate(itertools.product(MS, (torch.float16, torch.bfloat16)))]


@needs_triton
@pytest.mark.parametrize("n,k,group_size,sym,fraction,m,dtype,bias", CASES)
def test_table_config_matches_reference(n, k, group_size, sym, fraction, m, dtype, bias):
    run(n, k, group_size, fraction, sym, m, dtype, bias)


# tile shapes, split-K (explicit splits 1, 2, 3 of 5 blocks; auto), the software-pipelined loop (PIPE 2, 3), the
# BR outlier slots per epilogue step, 2 and 4 warps, OS outlier-only programs (1 / 3 / 2, with 1 / 3 K splits), PRE
# slots loaded ahead of the K loop (4 and 2 of a split's 12, 16 of its 8); IL, the slots added inside the K loop (BR 2
# on splits of 3 and 2 blocks with 12 slots each: 6 / 4 in the loop, the rest after it; 1 split, 24 slots at BR 4: 20
# in the loop, 4 after; PRE 2 then 1 per block; 4 warps); OF, the slots added before the K loop (splits of 3 and 1
# blocks, BR 2 / 4, over PRE and IL, 4 warps)
@needs_triton
@pytest.mark.parametrize("config", ((16, 16, 1, 1), (16, 32, 1, 2), (32, 32, 1, 3), (64, 16, 1, 0), (16, 64, 1, 0),
                                    (32, 32, 2, 2), (16, 32, 1, 2, 2), (16, 32, 1, 3, 3), (32, 16, 1, 1, 2, 2),
                                    (16, 64, 1, 0, 2, 4), (16, 64, 1, 3, 1, 1), (64, 64, 4, 2, 2),
                                    (16, 64, 1, 0, 2, 0, 1), (16, 32, 1, 1, 2, 2, 3), (32, 32, 1, 3, None, 4, 2),
                                    (16, 32, 1, 2, 2, 0, 0, 4), (16, 64, 1, 0, 2, 1, 0, 2),
                                    (32, 32, 1, 3, 2, 2, 0, 16), (64, 256, 8, 0, 2),
                                    (16, 32, 1, 2, 2, 2, 0, 0, 0, 1), (16, 64, 1, 1, 2, 4, 0, 0, 0, 1),
                                    (32, 32, 1, 3, None, 1, 0, 2, 0, 1), (16, 128, 4, 2, 2, 0, 0, 0, 0, 1),
                                    (16, 32, 1, 2, 2, 2, 0, 0, 0, 0, 1), (32, 32, 1, 1, 2, 4, 0, 2, 0, 1, 99),
                                    (16, 128, 4, 2, 2, 0, 0, 0, 0, 0, 2)))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_tiles_and_splits(config, dtype):
    run(50, 1200, -1, 0.02, False, 37, dtype, True, seed=config[1], config=config)


@needs_triton
@pytest.mark.parametrize("gather_x", (True, False))
@pytest.mark.parametrize("m", (3, 16))
def test_outliers_from_x_or_its_transpose(gather_x, m):
    run(40, 700, 256, 0.05, False, m, torch.float16, False, seed=m, config=(16, 32, 1, 2, 2), gather_x=gather_x)


@needs_triton
@pytest.mark.parametrize("gather_x", (True, False))
def test_outliers_in_the_k_loop_with_groups(gather_x):
    """IL with groups of blocks: the loop's slot sums go into acc unscaled (per channel: divided by the scale)."""
    run(40, 700, 256, 0.05, False, 5, torch.float16, True, seed=3, config=(16, 32, 1, 2, 2, 1, 0, 0, 0, 1),
        gather_x=gather_x)


@needs_triton
@pytest.mark.parametrize("gather_x", (True, False))
def test_outliers_before_the_k_loop_with_groups(gather_x):
    """OF with groups of blocks: the slot sums start acc unscaled (per channel: divided by the scale)."""
    run(40, 700, 256, 0.05, False, 5, torch.float16, True, seed=4, config=(16, 32, 1, 2, 2, 2, 0, 0, 0, 0, 2),
        gather_x=gather_x)


@needs_triton
@pytest.mark.parametrize("group_size,sym", ((-1, False), (-1, True), (256, False)))
@pytest.mark.parametrize("config", ((16, 32, 1, 2, 2, 2, 0, 0, 0, 0, 2), (16, 32, 1, 2, 2, 1, 0, 0, 0, 1)))
def test_zero_scales_under_division(group_size, sym, config):
    """OF / IL divide the outlier sums by the row's scale: a checkpoint's zero scales (all-zero rows or groups
    that still hold outliers; other writers than quantease may store them) are re-encoded exactly at load."""
    n, k, m = 40, 700, 5
    w = list(make_weight(n, k, 3, group_size, 0.05, sym, 5))
    w[1] = w[1].clone()
    w[1][::3] = 0  # every third row (all its groups), then one group of another row
    w[1][1, -1] = 0
    p = gemv_half2.add_layout(prepare_weights(*w, 3, group_size, k))
    assert bool((p["scales"] != 0).all())
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    y = gemm_half2.qgemm_half2(x, p, None, torch.full((m, n), float("nan")).half().to(DEVICE), config)
    check(y, reference64(x, w, 3, group_size, k, None), torch.float16)


@needs_triton
@pytest.mark.parametrize("config", (None, (16, 32, 1, 2)))
def test_outliers_only(config):  # the benchmarks' epilogue-alone mode: y = x @ H^T + bias, the K loop skipped
    w, p, x, b, out = make(40, 700, -1, 0.05, False, 5, torch.float16, True, seed=7)
    y = gemm_half2.qgemm_half2(x, p, b, out, config, outliers_only=True)
    dense_h = torch.zeros(40, 700, dtype=torch.float64)
    dense_h.scatter_add_(1, w[3].long().cpu(), w[4].double().cpu())
    check(y.cpu(), x.double().cpu() @ dense_h.t() + b.double().cpu(), torch.float16)


@needs_triton
def test_extreme_codes_and_zeros():
    """All codes 0 or 7 against zeros 0 / 7 (the ends of every HSUB2 constant), and the spare slot's columns."""
    n, k = 16, 512
    w = list(make_weight(n, k, 3, 256, 0.0, False, 3))
    from quantease.format import layout
    codes = torch.where(torch.rand(n, k, generator=torch.Generator().manual_seed(4)) < 0.5, 0, 7)
    w[0] = layout.pack_codes(codes, 3).to(DEVICE)
    w[2] = torch.tensor([[0, 7], [7, 0]] * (n // 2), dtype=torch.uint8).to(DEVICE)
    p = gemv_half2.add_layout(prepare_weights(*w, 3, 256, k))
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(5, k).to(dtype).to(DEVICE)
        out = torch.full((5, n), float("nan"), dtype=dtype, device=DEVICE)
        check(gemm_half2.qgemm_half2(x, p, None, out), reference64(x, tuple(w), 3, 256, k, None), dtype)


@needs_triton
def test_dispatch_takes_it_for_batched_decode(monkeypatch):
    """M = MIN_M..MAX_M go to gemm_half2 where the Q = 8 words are there; M = 1 to the GEMV, larger M and layers
    without the words (groups of 128, uint8 zeros) to the GEMV (M = 2) or gemm_swap; all match the reference."""
    calls = []
    real = gemm_half2.qgemm_half2
    monkeypatch.setattr(gemm_half2, "qgemm_half2", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def one(m, group_size=-1, words=True, k=600):
        w = make_weight(24, k, 3, group_size, 0.02, False, m)
        # on CUDA prepare_weights adds the words itself (and drops the planes where they are at Q = 8)
        p = prepare_weights(*w, 3, group_size, k, planes=None if words else "keep")
        p = gemv_half2.add_layout(p) if words else dict(p, words=None)
        x = torch.randn(m, k).half().to(DEVICE)
        out = torch.full((m, 24), float("nan"), dtype=torch.float16, device=DEVICE)
        check(qlinear_prepared(x, p, None, backend="triton", out=out), reference64(x, w, 3, group_size, k, None),
              torch.float16)
        return len(calls)

    assert one(gemm_half2.MIN_M) == 1 and one(16) == 2 and one(gemm_half2.MAX_M) == 3
    assert one(1) == 3 and one(gemm_half2.MAX_M + 1) == 3  # GEMV; gemm_swap (CPU) / dequant + cuBLAS (CUDA)
    assert one(16, group_size=128, k=512) == 3 and one(2, group_size=128, k=512) == 3  # Q = 4 words: not its layout
    assert one(16, words=False) == 3  # planes only


def test_unsupported_inputs_raise_one_clear_error():
    w = make_weight(8, 300, 3, -1, 0.0, False, 8, device="cpu")
    p = prepare_weights(*w, 3, -1, 300)
    x = torch.randn(4, 300).half()
    with pytest.raises(QuantEaseError, match="words absent"):
        gemm_half2.qgemm_half2(x, p, None, torch.empty(4, 8).half())
    p = gemv_half2.add_layout(p)
    assert p["zeros"].dtype == torch.int16 and gemm_half2.supports(p, x)
    with pytest.raises(QuantEaseError, match="float32"):
        gemm_half2.qgemm_half2(x.float(), p, None, torch.empty(4, 8))
    p128 = gemv_half2.add_layout(prepare_weights(*make_weight(8, 256, 3, 128, 0.0, False, 8, device="cpu"), 3,
                                                 128, 256))
    assert p128["zeros"].dtype == torch.uint8 and not gemm_half2.supports(p128, x)


def test_outlier_path_rule():
    """The epilogue by default; after the GEMM for few rows on layers with many slots, and above FUSED_MAX_BM."""
    big = gemm_half2.SPLIT_ADD_MIN_SLOTS
    assert gemm_half2.pick_outlier_path(2, 8192, 41, 16) == "fused"  # 8192^2 at 0.5%: 336 k slots
    assert gemm_half2.pick_outlier_path(2, 28672, 41, 16) == "split"  # 1.18 M slots
    assert gemm_half2.pick_outlier_path(gemm_half2.SPLIT_ADD_MAX_M, big, 1, 16) == "split"
    assert gemm_half2.pick_outlier_path(gemm_half2.SPLIT_ADD_MAX_M + 1, big, 1, 16) == "fused"
    assert gemm_half2.pick_outlier_path(2, big, 1, 16, outliers_only=True) == "fused"
    assert gemm_half2.pick_outlier_path(64, 8192, 41, 64) == "ell"


def test_config_table():
    assert gemm_half2.pick_config(2) == gemm_half2.CONFIGS[2]
    assert gemm_half2.pick_config(3) == gemm_half2.CONFIGS[16]
    assert gemm_half2.pick_config(17) == gemm_half2.CONFIGS[32]
    assert gemm_half2.pick_config(999) == gemm_half2.CONFIGS[gemm_half2.MAX_M]
    assert 1 < gemm_half2.MIN_M <= ops.GEMV_MAX_M < gemm_half2.MAX_M


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("m", (4, 16, 32))
def test_cuda_graph_capture(m):
    w, p, x, b, out = make(64, 1024, -1, 0.01, False, m, torch.float16, True)
    ref = reference64(x, w, 3, -1, 1024, b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gemm_half2.qgemm_half2(x, p, b, out)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemm_half2.qgemm_half2(x, p, b, out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, ref, torch.float16)


@needs_triton
@pytest.mark.parametrize("path", ("fused", "ell", "split"))
@pytest.mark.parametrize("m", (2, 16, 37))
def test_outlier_paths(path, m):
    """The three places the outliers can be added (epilogue, ell_add after, ell_split_add after) give the same y."""
    w, p, x, b, out = make(50, 900, -1, 0.05, False, m, torch.float16, True, seed=m)
    y = gemm_half2.qgemm_half2(x, p, b, out, outlier_path=path)
    check(y, reference64(x, w, 3, -1, 900, b), torch.float16)


@needs_triton
def test_default_split_add(monkeypatch):
    """The default path where pick_outlier_path picks the split add (threshold lowered to this small layer's slots)."""
    w, p, x, b, out = make(50, 900, -1, 0.05, False, 3, torch.float16, True, seed=3)
    monkeypatch.setattr(gemm_half2, "SPLIT_ADD_MIN_SLOTS", 50 * p["outlier_idx"].shape[1])
    assert gemm_half2.pick_outlier_path(3, 50, p["outlier_idx"].shape[1], 16) == "split"
    y = gemm_half2.qgemm_half2(x, p, b, out)
    check(y, reference64(x, w, 3, -1, 900, b), torch.float16)


def test_outlier_path_rejected():
    w, p, x, b, out = make(16, 256, -1, 0.05, False, 2, torch.float16, False)
    with pytest.raises(QuantEaseError, match="outlier_path"):
        gemm_half2.qgemm_half2(x, p, b, out, outlier_path="later")
