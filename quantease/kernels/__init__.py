"""Kernels for y = x @ dequant(Q)^T + x @ H^T: a torch reference plus Triton GEMV/GEMM paths (see ops.py)."""
from quantease.kernels.ops import qlinear, qlinear_prepared  # noqa: F401
from quantease.kernels.prepare import dequantize_prepared, prepare_weights  # noqa: F401
from quantease.kernels.reference import qlinear_reference  # noqa: F401
