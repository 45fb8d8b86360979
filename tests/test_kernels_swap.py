"""kernels/gemm_swap.py (v5 swap-AB GEMM) against the float64 reference, outputs NaN-poisoned before every run.

CPU: the kernels run under TRITON_INTERPRET=1 (set by tests/test_kernels.py's import, before any kernel module is
imported) on small odd shapes; CUDA: the same cases compiled (atomics for split-K, the tf32 register-A path).
"""
import itertools

import pytest
import torch

from test_kernels import DEVICE, check, make_case, make_weight, needs_triton, reference64  # first: sets TRITON_INTERPRET
from quantease.errors import QuantEaseError
from quantease.format import layout
from quantease.kernels import prepare_weights
from quantease.kernels import gemm_swap


pytestmark = pytest.mark.usefixtures("keep_planes")  # plane kernels called directly (conftest.py)


MS = (1, 3, 5, 16, 30, 65, 100, 250)
SHAPES = ((96, 160), (33, 96), (40, 600), (72, 300))
GRIDS = ((-1, True), (64, False), (256, True), (-1, False), (32, True))


def run_swap(n, k, bits, group_size, fraction, sym, m, dtype, bias, seed=0, config=None, fused=None, gather_x=None):
    w, p, x, b, out = make_case(n, k, bits, group_size, fraction, sym, m, dtype, bias, seed)
    y = gemm_swap.qgemm_swap(x, p, b, out, config=config, outliers_fused=fused, gather_x=gather_x)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    check(y, reference64(x, w, bits, group_size, k, b), dtype)
    return p, x


# every M x dtype with the table's config for that M, cycling shape / bits / grid / outliers / bias
CASES = []
for i, (m, dtype) in enumerate(itertools.product(MS, (torch.float16, torch.bfloat16))):
    n, k = SHAPES[i % 4]
    group_size, sym = GRIDS[i % 5]
    CASES.append((n, k, (3, 2, 4, 3, 8)[i % 5], group_size, (0.0, 0.05, 0.02)[i % 3], sym, m, dtype, i % 2 == 0))


@needs_triton
@pytest.mark.parametrize("n,k,bits,group_size,fraction,sym,m,dtype,bias", CASES)
def test_table_config_matches_reference(n, k, bits, group_size, fraction, sym, m, dtype, bias):
    run_swap(n, k, bits, group_size, fraction, sym, m, dtype, bias)


# both A paths (tf32 register-A, 16-bit A) x split-K x outliers fused / separate
@needs_triton
@pytest.mark.parametrize("rega", (True, False))
@pytest.mark.parametrize("split,fused", ((1, True), (2, False), (8, True)))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_paths_split_outliers(rega, split, fused, dtype):
    run_swap(72, 2100, 3, -1, 0.02, True, 19, dtype, True, seed=split, config=(16, 64, 4, 1, split, rega),
             fused=fused)


@needs_triton
@pytest.mark.parametrize("bits,group_size,sym", ((3, 256, True), (3, 512, False), (4, 256, True), (3, 128, False),
                                                 (2, 32, True), (8, -1, False)))
def test_grids_on_both_paths(bits, group_size, sym):  # mode 1 (whole blocks), mode 2 (per element), sym / asym
    for rega in (True, False):
        run_swap(40, 1100, bits, group_size, 0.01, sym, 7, torch.float16, False, seed=bits,
                 config=(16, 64, 4, 1, 2, rega))


class LaunchSpy:
    """Stands in for qgemm_swap_kernel: records the constexprs of each launch, then runs the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


# asymmetric grids (uint8 zeros) on the tf32 register-A path: the loop runs the symmetric unpack (c - 2**(b-1)),
# the epilogue takes (z - 2**(b-1)) * sum_k x off (per split, per block for groups of whole blocks).  Every M of
# the dispatch and beyond, fp16 / bf16, outliers or not, split-K 1 / > 1, x prefetch; M > 64 with BM = 64 tiles.
ASYM_CASES = []
for i, (m, dtype) in enumerate(itertools.product(MS, (torch.float16, torch.bfloat16))):
    n, k = ((72, 1100), (33, 600), (40, 2100), (96, 300))[i % 4]
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    split, xpf = ((1, 0), (2, 4), (4, 2), (1, 1))[(i // 2) % 4]
    ASYM_CASES.append((n, k, (3, 3, 4, 3, 2, 3, 8, 3)[i % 8], (-1, -1, -1, 256)[(i // 3) % 4],
                       (0.0, 0.02)[(i // 2) % 2], m, dtype, i % 3 == 0, (bm, 64, 4, 1, split, True, xpf)))


@needs_triton
@pytest.mark.parametrize("n,k,bits,group_size,fraction,m,dtype,bias,config", ASYM_CASES)
def test_asym_register_a(monkeypatch, n, k, bits, group_size, fraction, m, dtype, bias, config):
    spy = LaunchSpy(gemm_swap.qgemm_swap_kernel)
    monkeypatch.setattr(gemm_swap, "qgemm_swap_kernel", spy)
    p, x = run_swap(n, k, bits, group_size, fraction, False, m, dtype, bias, seed=m + bits, config=config)
    assert p["zeros"] is not None and gemm_swap.rega_ok(p, x)
    assert [(c["REGA"], c["HAS_ZEROS"]) for c in spy.launches] == [(True, True)]


# the asymmetric correction cancels: codes within 1 of zeros 1 or 6 (mean c - z = 0) and x with mean 4, so the loop's
# sum_k (c - 4) x and the epilogue's (z - 4) sum_k x are each ~100x the result.  Exact in float32 arithmetic up to
# the accumulation roundings; on a GPU this checks the tensor cores' fp32 accumulation as well.
@needs_triton
@pytest.mark.parametrize("dtype,split", ((torch.float16, 1), (torch.bfloat16, 4)))
def test_asym_cancellation(dtype, split):
    n, k, m = 72, 4100, 16
    g = torch.Generator().manual_seed(5)
    z = torch.tensor((1, 6), dtype=torch.uint8)[torch.randint(0, 2, (n, 1), generator=g)]
    codes = z.long() + torch.randint(-1, 2, (n, k), generator=g)
    w = (layout.pack_codes(codes, 3), (torch.rand(n, 1, generator=g) * 0.02 + 0.005).half(), z, None, None)
    w = tuple(None if t is None else t.to(DEVICE) for t in w)
    x = (torch.randn(m, k, generator=g) + 4).to(dtype).to(DEVICE)
    p = prepare_weights(*w, 3, -1, k)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    gemm_swap.qgemm_swap(x, p, None, out, config=(16, 64, 4, 1, split, True, 2))
    ref = reference64(x, w, 3, -1, k, None)
    loop = x.double() @ ((codes.double() - 4) * w[1].double().cpu()).t().to(DEVICE)
    assert loop.norm() > 30 * ref.norm()  # the case does cancel
    check(out, ref, dtype)


@needs_triton
@pytest.mark.parametrize("config", ((32, 64, 4, 1, 1, True), (64, 128, 8, 3, 1, False), (128, 64, 4, 2, 1, False)))
def test_wide_tiles(config):  # M tiles and weight tiles that straddle both edges
    run_swap(200, 520, 3, -1, 0.02, True, 150, torch.float16, True, seed=3, config=config)


# x slot tiles loaded XPF slots ahead (the first XPF with the block's words): both A paths, 3-bit and 4-bit, K tail
@needs_triton
@pytest.mark.parametrize("xpf", (1, 2, 4))
@pytest.mark.parametrize("rega,bits", ((True, 3), (False, 3), (True, 4)))
def test_x_prefetch(xpf, rega, bits):
    run_swap(72, 1100, bits, -1, 0.02, True, 19, torch.float16, True, seed=xpf, config=(16, 64, 4, 1, 2, rega, xpf))


# the REGA K loop software-pipelined (PIPE, cp.async on a GPU): sym / asym, groups of whole blocks, 3/4-bit, split-K
@needs_triton
@pytest.mark.parametrize("pipe,sym,bits,group_size,m,split", (
    (2, True, 3, -1, 19, 2), (3, False, 3, -1, 5, 1), (2, False, 3, 512, 16, 3), (3, True, 4, -1, 40, 1)))
def test_pipelined_register_a(monkeypatch, pipe, sym, bits, group_size, m, split):
    spy = LaunchSpy(gemm_swap.qgemm_swap_kernel)
    monkeypatch.setattr(gemm_swap, "qgemm_swap_kernel", spy)
    bm = 16 if m <= 16 else 64
    run_swap(72, 1100, bits, group_size, 0.02, sym, m, torch.float16, True, seed=pipe + m,
             config=(bm, 64, 4, 1, split, True, 0, pipe))
    assert [(c["REGA"], c["PIPE"]) for c in spy.launches] == [(True, pipe)]


# 1-warp programs on the 16-bit path: triton emits mma.sync (no wgmma in one warp) with both operands in registers;
# M tiles 16 / 32 / 64 x 16 rows, split-K 4 / 2 (atomics), asym and sym, fp16 and bf16, fused outliers
@needs_triton
@pytest.mark.parametrize("m,dtype,sym,config", (
    (5, torch.float16, False, (16, 16, 1, 1, 0, False)), (16, torch.bfloat16, True, (16, 16, 1, 3, 2, False)),
    (30, torch.float16, False, (32, 16, 1, 1, 4, False)), (65, torch.bfloat16, False, (64, 16, 1, 1, 2, False))))
def test_one_warp_mma_sync_configs(m, dtype, sym, config):
    run_swap(72, 1100, 3, -1, 0.02, sym, m, dtype, True, seed=m, config=config, fused=True)


# WPF: the next block's words loaded one iteration ahead (the last block of each split loads nothing): 3-bit per
# channel with a ragged 2-way split (5 blocks: 3 + 2), 4-bit groups of 256, 2-bit per-element groups of 64
@needs_triton
@pytest.mark.parametrize("bits,group_size,m,dtype,config", (
    (3, -1, 13, torch.float16, (16, 32, 1, 1, 0, False, 0, None, 1)),
    (4, 256, 3, torch.bfloat16, (16, 16, 1, 1, 2, False, 0, None, 1)),
    (2, 64, 30, torch.float16, (32, 16, 1, 1, 1, False, 0, None, 1))))
def test_word_prefetch_configs(bits, group_size, m, dtype, config):
    run_swap(72, 1100, bits, group_size, 0.02, False, m, dtype, True, seed=m, config=config, fused=True)


def test_pipe_arguments_checked():
    w = make_weight(8, 256, 3, -1, 0.0, True, 8, device="cpu")
    p = prepare_weights(*w, 3, -1, 256)
    for cfg in ((16, 64, 4, 1, 1, True, 2, 2), (16, 64, 4, 1, 1, True, 0, 1)):  # XPF with PIPE; depth 1
        with pytest.raises(QuantEaseError, match="PIPE="):
            gemm_swap.qgemm_swap(torch.randn(3, 256).half(), p, None, torch.empty(3, 8).half(), cfg)


# fused outliers gathered from x itself (no transposed copy), with an M tile that straddles M, and split-K
@needs_triton
@pytest.mark.parametrize("m,split", ((3, 1), (13, 4), (40, 2)))
def test_outliers_gather_from_x(m, split):
    run_swap(72, 1100, 3, -1, 0.03, True, m, torch.float16, True, seed=m,
             config=(16 if m <= 16 else 32, 64, 4, 1, split, True), fused=True, gather_x=True)


@needs_triton
def test_float32_activations():
    run_swap(33, 96, 3, -1, 0.05, True, 20, torch.float32, True)


def test_gather_x_choice():  # from x while N x R x (M - 1) extra sectors stay small, else the x^T copy
    assert gemm_swap.pick_gather_x(4, 4096, 21) and gemm_swap.pick_gather_x(16, 4096, 21)  # 4096^2 at 0.5%
    assert not gemm_swap.pick_gather_x(16, 8192, 143)  # 8192x28672 at 0.5%: 18 M sectors
    assert not gemm_swap.pick_gather_x(4, 8192, 0) and not gemm_swap.pick_gather_x(32, 64, 2)


def test_split_choice():
    assert gemm_swap.pick_split(16, 4096, 4096, 16, 64, target=512) == 8  # 64 programs, 16 blocks -> 8 x 2
    assert gemm_swap.pick_split(16, 8192, 8192, 16, 64, target=512) == 4  # 128 programs -> 512
    assert gemm_swap.pick_split(16, 28672, 8192, 16, 64, target=512) == 2  # 448 programs -> 896
    assert gemm_swap.pick_split(256, 28672, 8192, 128, 128, target=128) == 1  # 448 programs already
    assert gemm_swap.pick_split(16, 4096, 512, 16, 64, target=512) == 1  # 2 blocks: nothing to split
    assert gemm_swap.pick_split(16, 8192, 8192, 16, 16, target=gemm_swap.SPLIT_TARGET_ONE_WARP) == 4  # 1-warp
    assert gemm_swap.pick_config(3) == gemm_swap.CONFIGS[16] and gemm_swap.pick_config(999) == gemm_swap.CONFIGS[256]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("m,sym", ((16, True), (200, True), (16, False)))
def test_cuda_graph_capture(m, sym):
    w = make_weight(256, 1024, 3, -1, 0.01, sym, 7)
    p = prepare_weights(*w, 3, -1, 1024)
    x = torch.randn(m, 1024, device="cuda").half()
    out = torch.empty(m, 256, device="cuda", dtype=torch.half)
    gemm_swap.qgemm_swap(x, p, None, out)  # warm-up: compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemm_swap.qgemm_swap(x, p, None, out)
    x.copy_(torch.randn(m, 1024, device="cuda").half())  # new input, same buffer: the replay must see it
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, reference64(x, w, 3, -1, 1024, None), torch.float16)
