"""The packed layout: the one contract between quantize, the kernels and every runtime.

Codes (per linear, W is N x K: N outputs, K inputs)
    qweight  int32 [N, Kp // 32 * bits]   Kp = K rounded up to a multiple of 32 (padding codes are 0).
             Each run of 32 input columns takes exactly `bits` int32 words, stored consecutively along K.
             The words of one run hold "bit planes" of power-of-two width, lowest plane first:
               bits=2: 2 words, 2-bit plane (16 codes per word)
               bits=3: 2 words of the 2-bit plane (codes 0-15, 16-31), then 1 word of the 1-bit plane
               bits=4: 4 words, 4-bit plane (8 codes per word)
               bits=8: 8 words, 8-bit plane (4 codes per word)
             Code i of a run sits in plane word i // per_word at bit offset (i % per_word) * width;
             a code is the planes OR-ed together, each shifted by the plane's offset (0 for the first,
             2 for the 1-bit plane of a 3-bit code).  So bits/weight of the codes is exactly `bits`, a
             row-parallel shard on a 32-aligned K boundary is a contiguous column slice, and a kernel
             unpacks with shifts and masks only.
Grid
    scales   fp16 [N, G]   G = ceil(K / group_size), or 1 when group_size == -1 (per output channel)
    zeros    uint8 [N, G]  asymmetric grids only; symmetric grids use zero = 2 ** (bits - 1)
             w = scale * (code - zero)
Outliers (sparse fp16 H, added to the dequantized weight)
    outlier_idx  int16 (K < 32768) or int32 [N, R]   input-column index of each slot
    outlier_val  fp16 [N, R]
             ELL layout: every output row has the same number of slots R = outlier_slots(K, fraction), so
             fused q/k/v or gate/up layers concatenate along N and column-parallel shards slice rows.
             Within a row indices are non-decreasing; unused slots carry value 0 and repeat the row's
             last index (or 0).  A row-parallel shard keeps the slots inside its column range, re-bases
             them, and pads with zeros back to R.
"""
import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
RUN = 32  # input columns per packed run

# (width, number of words) of each plane, lowest first
PLANES = {2: ((2, 2),), 3: ((2, 2), (1, 1)), 4: ((4, 4),), 8: ((8, 8),)}

TENSORS = ("qweight", "scales", "zeros", "outlier_idx", "outlier_val")


def check_bits(bits):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")


def padded_k(k):
    return (k + RUN - 1) // RUN * RUN


def num_groups(k, group_size):
    return 1 if group_size == -1 else (k + group_size - 1) // group_size


def outlier_slots(k, fraction):
    """Outlier slots per output row: the per-row budget that makes ||H||_0 <= fraction * N * K."""
    return int(math.floor(fraction * k + 1e-9))


def index_dtype(k):
    return torch.int16 if k < 2 ** 15 else torch.int32


def pack_codes(codes, bits):
    """uint8/int codes [N, K] in [0, 2**bits) -> int32 qweight [N, Kp // 32 * bits]."""
    check_bits(bits)
    n, k = codes.shape
    c = torch.zeros(n, padded_k(k), dtype=torch.int64, device=codes.device)
    c[:, :k] = codes.to(torch.int64)
    runs = c.view(n, -1, RUN)  # [N, Kp/32, 32]
    words, shift = [], 0
    for width, nwords in PLANES[bits]:
        per_word = RUN // nwords
        plane = (runs >> shift) & ((1 << width) - 1)
        plane = plane.view(n, -1, nwords, per_word)
        offsets = torch.arange(per_word, device=codes.device) * width
        words.append((plane << offsets).sum(-1))  # disjoint bits: sum == OR
        shift += width
    packed = torch.cat(words, dim=-1).view(n, -1)
    # reinterpret the low 32 bits as int32 (two's complement)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)
    return packed.to(torch.int32).contiguous()


def unpack_codes(qweight, bits, k):
    """int32 qweight [N, Kp // 32 * bits] -> uint8 codes [N, k]."""
    check_bits(bits)
    n = qweight.shape[0]
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    words = words.view(n, -1, bits)  # [N, runs, bits]
    codes = torch.zeros(n, words.shape[1], RUN, dtype=torch.int64, device=qweight.device)
    first, shift = 0, 0
    for width, nwords in PLANES[bits]:
        per_word = RUN // nwords
        offsets = torch.arange(per_word, device=qweight.device) * width
        plane = (words[:, :, first:first + nwords, None] >> offsets) & ((1 << width) - 1)
        codes |= plane.reshape(n, -1, RUN) << shift
        first += nwords
        shift += width
    return codes.view(n, -1)[:, :k].to(torch.uint8)


def slice_outliers(idx, val, start, end):
    """Outlier slots of input columns [start, end), re-based to start and padded back to R slots.

    Used for row-parallel tensor-parallel shards. Keeps the ELL invariants (non-decreasing indices,
    zero-valued padding that repeats the last index)."""
    r = idx.shape[1]
    cols = idx.to(torch.int64)
    keep = (cols >= start) & (cols < end) & (val != 0)
    # stable sort puts kept slots first, in their original (sorted) order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    new_idx = torch.gather(cols - start, 1, order)
    new_val = torch.gather(val, 1, order)
    kept = torch.gather(keep, 1, order)
    last = torch.where(kept, new_idx, torch.zeros_like(new_idx)).amax(dim=1, keepdim=True)
    new_idx = torch.where(kept, new_idx, last)
    new_val = torch.where(kept, new_val, torch.zeros_like(new_val))
    assert new_idx.shape[1] == r
    return new_idx.to(idx.dtype), new_val


def dequantize_packed(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, k,
                      dtype=torch.float32):
    """The packed tensors -> dense weight [N, k]. Defines the semantics every kernel must match."""
    codes = unpack_codes(qweight, bits, k).to(torch.float32)
    n = codes.shape[0]
    g = k if group_size == -1 else group_size
    cols = torch.arange(k, device=codes.device) // g
    s = scales.to(torch.float32)[:, cols]
    z = (zeros.to(torch.float32)[:, cols] if zeros is not None
         else torch.full_like(s, float(2 ** (bits - 1))))
    w = s * (codes - z)
    if outlier_idx is not None and outlier_idx.numel():
        w.scatter_add_(1, outlier_idx.to(torch.int64), outlier_val.to(torch.float32))
    assert w.shape == (n, k)
    return w.to(dtype)
