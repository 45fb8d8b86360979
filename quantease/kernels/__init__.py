"""Kernels for y = x @ dequant(Q)^T + x @ H^T: a torch reference plus Triton GEMV/GEMM paths."""
from quantease.kernels.reference import qlinear_reference  # noqa: F401
