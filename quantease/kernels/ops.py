"""Dispatch for the fused quantized linear (to be replaced by the Triton paths; the signature is fixed).

qlinear(x [..., K] fp16/bf16/fp32, qweight int32 [N, Kp/32*bits], scales fp16 [N, G], zeros uint8 [N, G] | None,
        outlier_idx int16/int32 [N, R] | None, outlier_val fp16 [N, R] | None, bias [N] | None,
        bits, group_size, in_features) -> y [..., N] in x's dtype
"""
from quantease.kernels.reference import qlinear_reference


def qlinear(x, qweight, scales, zeros, outlier_idx, outlier_val, bias, bits, group_size, in_features):
    shape = x.shape
    y = qlinear_reference(x.reshape(-1, shape[-1]), qweight, scales, zeros, outlier_idx, outlier_val, bias,
                          bits, group_size, in_features)
    return y.reshape(*shape[:-1], y.shape[-1])
