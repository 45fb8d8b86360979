"""QuantEaseLinear: a linear layer that holds the packed tensors of format.layout and runs kernels.ops.qlinear."""
import torch
from torch import nn

from quantease.format import layout
from quantease.format.checkpoint import FLOAT, layer_spec, linear_dims
from quantease.kernels import ops


class QuantEaseLinear(nn.Module):
    """y = x @ (scale * (code - zero) + H)^T + bias. Buffers, not parameters: nothing here trains."""

    def __init__(self, in_features, out_features, bias, bits, group_size, sym=False, outlier_fraction=0.0,
                 dtype=torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        qc = {"bits": bits, "group_size": group_size, "sym": sym, "outlier_fraction": outlier_fraction}
        spec = layer_spec(out_features, in_features, qc, bias)
        for name in layout.TENSORS + ("bias",):
            if name in spec:
                t_dtype, shape = spec[name]
                t_dtype = dtype if t_dtype == FLOAT else t_dtype
                self.register_buffer(name, torch.zeros(shape, dtype=t_dtype, device=device))
            else:
                self.register_buffer(name, None)

    @classmethod
    def from_linear(cls, linear, qc, device=None):
        """Placeholder with the shapes of nn.Linear / Conv1D `linear` (usually on the meta device)."""
        n, k = linear_dims(linear)
        return cls(k, n, linear.bias is not None, qc["bits"], qc["group_size"], qc["sym"], qc["outlier_fraction"],
                   dtype=linear.weight.dtype, device=device if device is not None else linear.weight.device)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half() would round the fp16 scales and outlier values: let them move devices only
        keep = {n: self._buffers[n] for n in ("scales", "outlier_val") if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in keep.items():
            if self._buffers[n].dtype != t.dtype:
                self._buffers[n] = t.to(self._buffers[n].device)
        return self

    def forward(self, x):
        return ops.qlinear(x, self.qweight, self.scales, self.zeros, self.outlier_idx, self.outlier_val, self.bias,
                           self.bits, self.group_size, self.in_features)

    def dequantize(self, dtype=torch.float32):
        return layout.dequantize_packed(self.qweight, self.scales, self.zeros, self.outlier_idx, self.outlier_val,
                                        self.bits, self.group_size, self.in_features, dtype=dtype)

    def extra_repr(self):
        r = 0 if self.outlier_idx is None else self.outlier_idx.shape[1]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, outlier_slots={r}, bias={self.bias is not None}")


def replace_linears(model, qc):
    """Swap every nn.Linear the checkpoint stores quantized for a QuantEaseLinear of the same shape, in place.

    Called on the meta-device model before weights load, so no dense weight is ever materialised."""
    from quantease.format.checkpoint import layer_config, quantized_linears

    names = quantized_linears(model, qc)
    for name, linear in names.items():
        model.set_submodule(name, QuantEaseLinear.from_linear(linear, layer_config(qc, name)))
    return list(names)
