"""Load-time repack: checkpoint layout (quantease/format/layout.py) -> the layout the kernels read.

Rows are cut into blocks of BLOCK = 256 input columns (zero-padded at the end).  Inside a block the codes are
interleaved so that one shift amount serves a whole row of words and the matching x values are contiguous:

    plane0  int32 [N, nblocks * 8 * w]    w = width of the lowest plane (2 for 3-bit, else bits); WPB = 8 * w
            word q (0 <= q < WPB) of block b holds codes k = 256 b + j WPB + q at bits w j, j < 32 / w
    plane1  int32 [N, nblocks * 8]        3-bit only: bit 2 of the codes, 32 per word
            word h (0 <= h < 8) of block b: bit (2j + 2) % 32 <- code 256 b + 16 j + h,
                                             bit (2j + 3) % 32 <- code 256 b + 16 j + h + 8     (j < 16)
            so (plane1 >> (q // 8)) has code (q, j)'s bit 2 exactly 2 bits above its two low bits in plane0
            (after the same >> 16 for j >= 8): two LOP3s build the whole 3-bit code in place.

Scales stay fp16 [N, G], zeros stay uint8 [N, G] (or None: symmetric), outliers stay ELL (int16/int32 idx,
fp16 val).  Bytes are the checkpoint's, plus < 256 columns of padding per row.

On CUDA the half2 words (below) are built too, and where they are at Q = 8 (3-bit, per channel or groups of a
multiple of 256) every kernel reads them, so the planes are dropped (drop_planes; planes="keep" or
$QUANTEASE_PLANES=keep keeps both): 3 bits per weight in memory instead of 6.
"""
import os

import torch

from quantease.errors import QuantEaseError
from quantease.format import layout


def _check(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features):
    if bits not in layout.SUPPORTED_BITS:
        raise QuantEaseError(f"bits={bits} is not supported; choose one of {layout.SUPPORTED_BITS}")
    if group_size != -1 and group_size <= 0:
        raise QuantEaseError(f"group_size={group_size} must be -1 or positive")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise QuantEaseError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    want = layout.padded_k(in_features) // layout.RUN * bits
    if qweight.shape[1] != want:
        raise QuantEaseError(f"qweight has {qweight.shape[1]} words per row; in_features={in_features} at "
                             f"{bits} bits needs {want}")
    g = layout.num_groups(in_features, group_size)
    if tuple(scales.shape) != (n, g):
        raise QuantEaseError(f"scales shape {tuple(scales.shape)} != ({n}, {g}) for group_size={group_size}")
    if zeros is not None and tuple(zeros.shape) != (n, g):
        raise QuantEaseError(f"zeros shape {tuple(zeros.shape)} != ({n}, {g})")
    if (outlier_idx is None) != (outlier_val is None):
        raise QuantEaseError("outlier_idx and outlier_val must be given together")
    if outlier_idx is not None:
        if outlier_idx.shape != outlier_val.shape or outlier_idx.dim() != 2 or outlier_idx.shape[0] != n:
            raise QuantEaseError(f"outlier_idx {tuple(outlier_idx.shape)} / outlier_val "
                                 f"{tuple(outlier_val.shape)} must both be [{n}, R]")
        if outlier_idx.dtype not in (torch.int16, torch.int32):
            raise QuantEaseError(f"outlier_idx must be int16 or int32, got {outlier_idx.dtype}")


BLOCK = 256


def _pack_block_planes(codes, bits):
    """uint8/int codes [N, Kb] (Kb a multiple of BLOCK) -> (plane0, plane1 | None) in the block layout."""
    n, kb = codes.shape
    c = codes.to(torch.int32).view(n, kb // BLOCK, BLOCK)
    w = 2 if bits == 3 else bits
    wpb = 8 * w
    lo = (c & ((1 << w) - 1)).view(n, -1, 32 // w, wpb)  # [N, blocks, j, q]
    plane0 = torch.zeros(n, kb // BLOCK, wpb, dtype=torch.int32, device=codes.device)
    for j in range(32 // w):
        plane0 |= lo[:, :, j, :] << (w * j)
    plane1 = None
    if bits == 3:
        hi = ((c >> 2) & 1).view(n, -1, 16, 16)  # [N, blocks, j, q]
        plane1 = torch.zeros(n, kb // BLOCK, 8, dtype=torch.int32, device=codes.device)
        for j in range(16):
            plane1 |= hi[:, :, j, :8] << ((2 * j + 2) % 32)
            plane1 |= hi[:, :, j, 8:] << ((2 * j + 3) % 32)
        plane1 = plane1.view(n, -1)
    return plane0.view(n, -1), plane1


PLANES_ENV = "QUANTEASE_PLANES"  # "drop" (default) / "keep": see prepare_weights
PLANES_CHOICES = ("drop", "keep")


def keep_planes(planes=None):
    """prepare_weights' planes argument, or $QUANTEASE_PLANES, as a bool (True: keep the bit planes beside the
    half2 words)."""
    name = planes or os.environ.get(PLANES_ENV, "drop") or "drop"
    if name not in PLANES_CHOICES:
        raise QuantEaseError(f"planes={name!r} (argument or ${PLANES_ENV}) is not one of {PLANES_CHOICES}")
    return name == "keep"


def nonzero_scales(codes, scales, zeros, bits, group_size):
    """(codes [N, K], scales) with every zero scale re-encoded exactly: such a group's weights are all 0 (plus
    outliers), which its codes at the zero point under scale 1 say too.  So kernels may divide by the scales
    (gemm_half2's OF / IL add the outliers into the accumulator before the per-row scale).  quantease never writes
    a zero scale (its grids clamp them at 2^-24); other writers may.  Returns the inputs when there is none."""
    zero = scales == 0
    if not bool(zero.any()):
        return codes, scales
    k = codes.shape[1]
    cols = torch.arange(k, device=codes.device) // (k if group_size == -1 else group_size)
    point = zeros[:, cols] if zeros is not None else torch.full_like(codes, 2 ** (bits - 1))
    codes = torch.where(zero[:, cols], point.to(codes.dtype), codes)
    return codes, torch.where(zero, torch.ones_like(scales), scales)


def prepare_weights(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features, planes=None):
    """Checkpoint tensors -> dict the kernels read (qlinear_prepared).  Call once at load time.

    Keys: plane0, plane1 (the bit planes; plane1 None unless 3-bit), scales, zeros (None if symmetric),
    outlier_idx, outlier_val (None if no outliers or R == 0), words (the half2 layout; only on CUDA when the half2
    GEMV is selected, and None where it does not apply), bits, group_size, in_features, out_features.  The words are
    built here, at load time, so that runtimes keep them as a buffer (vLLM's memory profiling sees them; nothing is
    built during CUDA-graph capture).  Where the words are at Q = 8 (3-bit, per channel or groups of a multiple of
    256 columns) every CUDA kernel has a path on them (GEMV, gemm_half2, dequant_half2 + cuBLAS), so the planes are
    dropped (plane0 = plane1 = None: 3 bits per weight instead of 6) unless planes="keep" (or $QUANTEASE_PLANES=keep:
    benchmarks that time the plane kernels)."""
    _check(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features)
    keep = keep_planes(planes)
    n = qweight.shape[0]
    kb = (in_features + BLOCK - 1) // BLOCK * BLOCK
    codes = torch.zeros(n, kb, dtype=torch.uint8, device=qweight.device)
    codes[:, :in_features], scales = nonzero_scales(layout.unpack_codes(qweight, bits, in_features), scales, zeros,
                                                    bits, group_size)
    if outlier_idx is not None and outlier_idx.shape[1] == 0:
        outlier_idx = outlier_val = None
    p = dict(
        plane0=None, plane1=None,
        scales=scales.contiguous(),
        zeros=None if zeros is None else zeros.contiguous(),
        outlier_idx=None if outlier_idx is None else outlier_idx.contiguous(),
        outlier_val=None if outlier_val is None else outlier_val.contiguous(),
        bits=bits, group_size=group_size, in_features=in_features, out_features=n)
    if _builds_words(codes.device):
        from quantease.kernels import gemv_half2  # imports triton: CUDA machines only

        if gemv_half2.selected() == "half2":
            gemv_half2.add_layout(p, codes)
    if keep or not has_q8_words(p):  # planes the kernels will read (else never built: drop_planes' result)
        p["plane0"], p["plane1"] = _pack_block_planes(codes, bits)
    return p


def _builds_words(device):
    """prepare_weights builds the half2 words on CUDA only (a function: tests take the CUDA branch on the CPU)."""
    return device.type == "cuda"


def words_cover(bits, group_size):
    """The half2 words of this grid are at Q = 8: the GEMV, gemm_half2 and dequant_half2 all read them."""
    return bits == 3 and half2_words_per_role(group_size) == 8


def has_q8_words(p):
    return p.get("words") is not None and words_cover(p["bits"], p["group_size"])


def drop_planes(p):
    """p without its bit planes where its half2 words are at Q = 8 (every kernel path has them); returns p."""
    if has_q8_words(p):
        p["plane0"] = p["plane1"] = None
    return p


def weight_anchor(p):
    """A tensor of p that lives exactly as long as the layer's codes (caches are kept on it)."""
    return p["plane0"] if p.get("plane0") is not None else p["words"]


def codes_from_planes(plane0, plane1, bits, k):
    """Prepared planes -> integer codes [N, k] (int32); the inverse of the repack, for the torch path."""
    n = plane0.shape[0]
    w = 2 if bits == 3 else bits
    wpb = 8 * w
    words = plane0.view(n, -1, 1, wpb)  # [N, blocks, 1, q]
    shifts = (torch.arange(32 // w, device=plane0.device, dtype=torch.int32) * w).view(1, 1, -1, 1)
    codes = (words >> shifts) & ((1 << w) - 1)  # [N, blocks, j, q]
    if bits == 3:
        h = plane1.view(n, -1, 1, 8)
        j = torch.arange(16, device=plane0.device, dtype=torch.int32).view(1, 1, -1, 1)
        first = (h >> ((2 * j + 2) % 32)) & 1
        second = (h >> ((2 * j + 3) % 32)) & 1
        codes = codes | (torch.cat([first, second], dim=3) << 2)
    return codes.reshape(n, -1)[:, :k]


def dequantize_prepared(p, dtype=torch.float32):
    """Prepared dict -> dense weight [N, K] (float32 math, same as layout.dequantize_packed)."""
    k, bits, group_size = p["in_features"], p["bits"], p["group_size"]
    if p.get("plane0") is None:  # the half2 words alone (drop_planes)
        codes = codes_from_half2(p["words"], half2_words_per_role(group_size), k).to(torch.float32)
    else:
        codes = codes_from_planes(p["plane0"], p["plane1"], bits, k).to(torch.float32)
    g = k if group_size == -1 else group_size
    cols = torch.arange(k, device=codes.device) // g
    s = p["scales"].to(torch.float32)[:, cols]
    z = (p["zeros"].to(torch.float32)[:, cols] if p["zeros"] is not None
         else torch.full_like(s, float(2 ** (bits - 1))))
    w = s * (codes - z)
    if p["outlier_idx"] is not None:
        w.scatter_add_(1, p["outlier_idx"].to(torch.int64), p["outlier_val"].to(torch.float32))
    return w.to(dtype)


# ---- half2 layout (kernels/gemv_half2.py): 3-bit codes placed so that one LOP3 yields two fp16/bf16 weights ----
#
# A run of 32 columns takes 3 int32 words, as in the checkpoint (exactly 3 bits per weight).  Each word is two
# 16-bit lanes; a lane holds 5 codes at bits 0, 3, 6, 9, 12 and one bit of a 6th code at bit 15.  The two lanes
# of a word always hold the two columns of one even/odd pair (2P, 2P + 1), so x read as int32 is already the
# matching half2 and the unpack (code bits OR-ed into the mantissa of a power of two, both lanes at once) gives
# that pair's weights.  Rows are cut into blocks of 32 Q columns (Q = 8 per channel and for groups of a multiple
# of 256 columns; 4 / 2 / 1 for groups of 128 / 64 / 32, so that a block never straddles a group).  Per block and
# row, 3 Q words: role r (0..2) word q is at index block * 3Q + r Q + q, and its slot j (0..4) holds column pair
# P = (5 r + j) Q + q of the block; bit r of pair P = 15 Q + q's codes sits at bits 15 / 31 of role r word q.  So
# for a fixed slot the Q words of a block need Q consecutive x pairs (one 32-byte run for Q = 8), and the step
# needs no gather.
H2_ROLES = 3  # words per 32 columns
H2_SLOTS = 5  # whole codes per 16-bit lane


def half2_words_per_role(group_size):
    """Q for a grid: the largest of 8, 4, 2, 1 whose 32 Q-column blocks never straddle a group; None: unsupported.
    Q = 8 (per channel, groups of a multiple of 256) is what kernels/gemm_half2.py reads too: for each code slot,
    a role's 8 words then hold 16 consecutive columns, one mma K step."""
    for q in (8, 4, 2, 1):
        if group_size == -1 or group_size % (32 * q) == 0:
            return q
    return None


def half2_supported(bits, group_size):
    return bits == 3 and half2_words_per_role(group_size) is not None


def pack_half2(codes, q):
    """Integer codes [N, Kb] (Kb a multiple of 32 q) -> int32 [N, Kb // 32 * 3] in the half2 layout."""
    n, kb = codes.shape
    c = codes.to(torch.int64).view(n, kb // (32 * q), 16, q, 2)  # [N, block, pair slot, q, lane]
    words = torch.zeros(n, kb // (32 * q), H2_ROLES, q, dtype=torch.int64, device=codes.device)
    for r in range(H2_ROLES):
        for j in range(H2_SLOTS):
            pair = c[:, :, H2_SLOTS * r + j]
            words[:, :, r] |= (pair[..., 0] << (3 * j)) | (pair[..., 1] << (16 + 3 * j))
        spare = (c[:, :, 15] >> r) & 1
        words[:, :, r] |= (spare[..., 0] << 15) | (spare[..., 1] << 31)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # low 32 bits as int32
    return words.to(torch.int32).view(n, -1)


def codes_from_half2(words, q, k):
    """Inverse of pack_half2: int32 words [N, W] -> integer codes [N, k] (int32)."""
    n = words.shape[0]
    wd = words.to(torch.int64).view(n, -1, H2_ROLES, q) & 0xFFFFFFFF
    lanes = torch.stack([wd & 0xFFFF, wd >> 16], dim=-1)  # [N, block, r, q, lane]
    slots = [(lanes[:, :, r] >> (3 * j)) & 7 for r in range(H2_ROLES) for j in range(H2_SLOTS)]
    spare = sum(((lanes[:, :, r] >> 15) & 1) << r for r in range(H2_ROLES))
    c = torch.stack(slots + [spare], dim=2)  # [N, block, pair slot, q, lane]
    return c.reshape(n, -1)[:, :k].to(torch.int32)


def _half2_dict(codes, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features):
    q = half2_words_per_role(group_size)
    if not half2_supported(bits, group_size):
        raise QuantEaseError(f"the half2 GEMV takes 3-bit codes with per-channel scales or groups of a multiple "
                             f"of 32 columns; got bits={bits}, group_size={group_size}")
    n = codes.shape[0]
    kb = (in_features + 32 * q - 1) // (32 * q) * (32 * q)
    padded = torch.zeros(n, kb, dtype=torch.int32, device=codes.device)
    padded[:, :in_features] = codes[:, :in_features].to(torch.int32)
    if outlier_idx is not None and outlier_idx.shape[1] == 0:
        outlier_idx = outlier_val = None
    return dict(
        words=pack_half2(padded, q), q=q,
        scales=scales.contiguous(),
        zeros=None if zeros is None else zeros.contiguous(),
        outlier_idx=None if outlier_idx is None else outlier_idx.contiguous(),
        outlier_val=None if outlier_val is None else outlier_val.contiguous(),
        bits=bits, group_size=group_size, in_features=in_features, out_features=n)


def prepare_half2(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features):
    """Checkpoint tensors -> dict for kernels/gemv_half2.py (keys: words, q, scales, zeros, outlier_idx,
    outlier_val, bits, group_size, in_features, out_features).  Call once at load time."""
    _check(qweight, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features)
    codes, scales = nonzero_scales(layout.unpack_codes(qweight, bits, in_features), scales, zeros, bits, group_size)
    return _half2_dict(codes, scales, zeros, outlier_idx, outlier_val, bits, group_size, in_features)


def half2_from_prepared(p, codes=None):
    """prepare_weights' dict -> prepare_half2's dict (same scales/zeros/outlier tensors, no copies of them); codes
    [N, >= in_features]: the layer's integer codes when at hand (else read back from the planes)."""
    if codes is None:
        codes = codes_from_planes(p["plane0"], p["plane1"], p["bits"], p["in_features"])
    return _half2_dict(codes, p["scales"], p["zeros"], p["outlier_idx"], p["outlier_val"], p["bits"],
                       p["group_size"], p["in_features"])
