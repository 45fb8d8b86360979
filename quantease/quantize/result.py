"""The one result type every quantizer returns and every later stage consumes."""
from dataclasses import dataclass, field

import torch

from quantease.format import layout


@dataclass
class QuantizedWeight:
    codes: torch.Tensor                 # uint8 [N, K], values in [0, 2**bits)
    scale: torch.Tensor                 # float32 [N, G]
    zero: torch.Tensor                  # float32 [N, G], integer-valued (2**(bits-1) for symmetric grids)
    bits: int
    group_size: int                     # -1: one group per output channel
    sym: bool = False
    outlier_idx: torch.Tensor | None = None   # int64 [N, R] input columns (ELL, see format.layout)
    outlier_val: torch.Tensor | None = None   # float16 [N, R]
    info: dict = field(default_factory=dict)  # method, sweeps, errors per sweep, seconds, ...

    @property
    def shape(self):
        return tuple(self.codes.shape)

    @property
    def num_outliers(self):
        if self.outlier_val is None:
            return 0
        return int((self.outlier_val != 0).sum())

    def grid_weight(self):
        """The on-grid part, scale * (code - zero), in float32."""
        n, k = self.codes.shape
        g = k if self.group_size == -1 else self.group_size
        cols = torch.arange(k, device=self.codes.device) // g
        return self.scale[:, cols] * (self.codes.to(torch.float32) - self.zero[:, cols])

    def outlier_weight(self):
        """The sparse part H as a dense float32 matrix."""
        h = torch.zeros(self.codes.shape, dtype=torch.float32, device=self.codes.device)
        if self.outlier_idx is not None and self.outlier_idx.numel():
            h.scatter_add_(1, self.outlier_idx.to(torch.int64), self.outlier_val.to(torch.float32))
        return h

    def dequantize(self, dtype=torch.float32):
        return (self.grid_weight() + self.outlier_weight()).to(dtype)

    @property
    def bits_per_weight(self):
        """Honest storage cost: packed codes, fp16 scales, uint8 zeros, 16-bit value + index per outlier slot."""
        n, k = self.codes.shape
        total = n * layout.padded_k(k) * self.bits
        total += self.scale.numel() * 16
        if not self.sym:
            total += self.zero.numel() * 8
        if self.outlier_idx is not None:
            idx_bits = torch.iinfo(layout.index_dtype(k)).bits
            total += self.outlier_idx.numel() * (16 + idx_bits)
        return total / (n * k)
