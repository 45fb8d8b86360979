"""Layer-wise quantizers: quantize_weight(W, Sigma) -> QuantizedWeight, and layer_error.

Sigma = X X^T of the calibration inputs of the layer (any positive scale: every method is
scale-invariant in Sigma).  Math runs in float32 on W's device.
"""
import math
import time

import torch

from quantease.errors import QuantEaseError
from quantease.format import layout
from quantease.quantize import grid
from quantease.quantize.result import QuantizedWeight

METHODS = ("rtn", "gptq", "quantease")
# per-method defaults, chosen by benchmarks/layer_quality.py (see benchmarks/results/layer_quality.md):
# QuantEase from W or RTN ended above GPTQ on SmolLM2 layers even after 20 sweeps; from GPTQ it is
# below it after 1 sweep, and sweeps past 10 gain < 0.1%.  The diag(Sigma)-weighted clipping search
# lowered GPTQ's and QuantEase's error on every layer tried; RTN stays the plain min-max baseline.
# Refitting the grid to the codes after each sweep lowered QuantEase's mean error on 14 SmolLM2 layers
# by 1.9% (3-bit) / 2.8% (4-bit), a second round (GPTQ on the refitted grid + sweeps, per-row best) by
# another 1.6% / 2.3%; a third round gains 0.6% for one more GPTQ run.  GPTQ stays the plain baseline.
DEFAULTS = {
    "rtn": dict(act_order=False, init=None, sweeps=0, clip=False),
    "gptq": dict(act_order=True, init=None, sweeps=1, clip=True),
    "quantease": dict(act_order=False, init="gptq", sweeps=10, clip=True, refit=True, rounds=2),
}

__all__ = ["quantize_weight", "layer_error", "QuantizedWeight", "METHODS"]


def layer_error(w, wq, sigma):
    """f = tr((W - Wq) Sigma (W - Wq)^T) and the relative error f / tr(W Sigma W^T)."""
    sigma = sigma.to(torch.float32)
    e = w.to(torch.float32) - wq.to(sigma.device, torch.float32)
    f = float(((e @ sigma) * e).sum())
    w = w.to(torch.float32)
    base = float(((w @ sigma) * w).sum())
    return f, (f / base if base > 0 else float("nan") if f > 0 else 0.0)


def check_inputs(w, sigma, bits, method, group_size, outlier_fraction, structured_outliers, sweeps, init):
    if method not in METHODS:
        raise QuantEaseError(f"method={method!r} is unknown; choose one of {METHODS}")
    grid.check_bits(bits)
    if not torch.is_tensor(w) or w.dim() != 2 or w.numel() == 0:
        raise QuantEaseError(f"W must be a non-empty 2-D tensor [out, in], got {getattr(w, 'shape', type(w))}")
    n, k = w.shape
    if not torch.is_tensor(sigma) or tuple(sigma.shape) != (k, k):
        raise QuantEaseError(f"Sigma must be [{k}, {k}] for W of shape {tuple(w.shape)}, "
                             f"got {tuple(getattr(sigma, 'shape', ()))}")
    if not torch.isfinite(w).all():
        raise QuantEaseError("W contains NaN or Inf")
    if not torch.isfinite(sigma).all():
        raise QuantEaseError("Sigma contains NaN or Inf")
    # a group wider than K is one (partial) group: a whole-model run passes one group_size to every layer
    if not (group_size == -1 or (isinstance(group_size, int) and not isinstance(group_size, bool)
                                 and group_size > 0)):
        raise QuantEaseError(f"group_size={group_size} must be -1 (per channel) or a positive integer")
    if not (isinstance(outlier_fraction, (int, float)) and 0 <= outlier_fraction < 0.5):
        raise QuantEaseError(f"outlier_fraction={outlier_fraction} must be in [0, 0.5)")
    if outlier_fraction > 0 and method != "quantease":
        raise QuantEaseError(f"outliers need method='quantease', not {method!r}")
    if structured_outliers and outlier_fraction == 0:
        raise QuantEaseError("structured_outliers=True needs outlier_fraction > 0")
    if method == "quantease":
        if not (isinstance(sweeps, int) and sweeps >= 1):
            raise QuantEaseError(f"sweeps={sweeps} must be a positive integer")
        from quantease.quantize.cd import INITS
        if init not in INITS:
            raise QuantEaseError(f"init={init!r} is unknown; choose one of {INITS}")
    s = sigma.to(torch.float32)
    diag = torch.diagonal(s)
    top = float(diag.abs().max())
    tol = 1e-4 * top + 1e-30
    if float((s - s.T).abs().max()) > tol * 10:
        raise QuantEaseError("Sigma is not symmetric (expected X X^T of the calibration inputs)")
    if float(diag.min()) < -tol:
        raise QuantEaseError("Sigma has a negative diagonal entry: it is not positive semi-definite")
    # every 2x2 principal minor of a PSD matrix is >= 0: |S_ij| <= sqrt(S_ii S_jj); O(K^2), cheap
    d = diag.clamp(min=0).sqrt()
    if bool((s.abs() > d[:, None] * d[None, :] * (1 + 1e-3) + tol).any()):
        raise QuantEaseError("Sigma is not positive semi-definite (|S_ij| > sqrt(S_ii S_jj))")


def quantize_weight(W, Sigma, bits=3, method="quantease", group_size=-1, sym=False, outlier_fraction=0.0,
                    structured_outliers=False, sweeps=None, damp=0.01, act_order=None, init=None,
                    clip=None, refit=None, rounds=None):
    """Quantize one linear weight W [out, in] given Sigma = X X^T [in, in] of its inputs.

    method: "rtn" | "gptq" | "quantease"; outlier_fraction > 0 (quantease only) adds a sparse fp16 H
    with R = layout.outlier_slots(in, fraction) slots per output row (on R shared columns if
    structured_outliers).  None options take the method's default (DEFAULTS).  Runs on W's device.
    quantease only: refit (refit the grid's scale/zero to the codes after each sweep, grid.refit) and
    rounds (> 1: restart, keep the better result per row; plain CD restarts from GPTQ on the refitted
    grid, unstructured outliers from another initial support, outliers.SUPPORTS).

    result.info: method, bits, group_size, sym, damp, act_order, clip, sweeps (done), seconds,
    error / rel_error (final f and f / tr(W Sigma W^T)); quantease adds init, init_error, errors and
    rel_errors (f after each sweep; with outliers after each CD + IHT round, the last one with the
    stored fp16 values); plain quantease also init_error (f of the init) and objective (the damped f
    that CD minimises, never increasing)."""
    t0 = time.time()
    defaults = DEFAULTS.get(method, {})
    sweeps = defaults.get("sweeps") if sweeps is None else sweeps
    init = defaults.get("init") if init is None else init
    act_order = defaults.get("act_order", False) if act_order is None else act_order
    clip = defaults.get("clip", False) if clip is None else clip
    refit = defaults.get("refit", False) if refit is None else refit
    rounds = defaults.get("rounds", 1) if rounds is None else rounds
    check_inputs(W, Sigma, bits, method, group_size, outlier_fraction, structured_outliers, sweeps, init)
    if method == "quantease" and not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1):
        raise QuantEaseError(f"rounds={rounds} must be a positive integer")
    if not (isinstance(damp, (int, float)) and 0 <= damp < 1e3 and math.isfinite(damp)):
        raise QuantEaseError(f"damp={damp} must be a finite number >= 0")

    w = W.detach().to(torch.float32)
    sigma = Sigma.detach().to(w.device, torch.float32)
    sigma = (sigma + sigma.T) / 2
    scale_f = float(torch.diagonal(sigma).mean())
    if scale_f > 0:
        sigma = sigma / scale_f  # keeps float32 well scaled whatever the token count
    info = dict(method=method, bits=bits, group_size=group_size, sym=sym, damp=damp, act_order=act_order,
                clip=clip)
    if method == "quantease":
        info["refit"], info["rounds"] = refit, rounds
    idx = val = None
    if method == "rtn":
        from quantease.quantize.rtn import rtn
        codes, scale, zero = rtn(w, bits, group_size, sym, clip, torch.diagonal(sigma))
        info["sweeps"] = 0
    elif method == "gptq":
        from quantease.quantize.gptq import gptq
        codes, scale, zero = gptq(w, sigma, bits, group_size, sym, damp, act_order, clip)
        info["sweeps"] = 1
    elif outlier_fraction > 0:
        from quantease.quantize.outliers import quantease_outliers
        r = layout.outlier_slots(w.shape[1], outlier_fraction)
        codes, scale, zero, idx, val, extra = quantease_outliers(
            w, sigma, bits, r, group_size, sym, damp, act_order, clip, init, sweeps, structured_outliers,
            refit=refit, rounds=rounds)
        info.update(extra)
        info.update(outlier_fraction=outlier_fraction, outlier_slots=r, structured_outliers=structured_outliers)
    else:
        from quantease.quantize.cd import quantease
        codes, scale, zero, extra = quantease(w, sigma, bits, group_size, sym, damp, act_order, clip, init, sweeps,
                                              refit=refit, rounds=rounds)
        info.update(extra)
    # f values from the algorithms are on the normalized Sigma: back to the caller's scale
    for key in ("errors", "objective"):
        if key in info:
            info[key] = [x * scale_f for x in info[key]]
    if info.get("init_error") is not None:
        info["init_error"] *= scale_f
    qw = QuantizedWeight(codes=codes.to(torch.uint8), scale=scale.to(torch.float32).contiguous(),
                         zero=zero.to(torch.float32).contiguous(), bits=bits, group_size=group_size, sym=sym,
                         outlier_idx=idx, outlier_val=val, info=info)
    f, rel = layer_error(w, qw.dequantize(), sigma)
    base = f / rel if rel else 0.0
    info["error"], info["rel_error"] = f * scale_f, rel
    if "errors" in info and base > 0:
        info["rel_errors"] = [x / (base * scale_f) for x in info["errors"]]
    info["seconds"] = time.time() - t0
    return qw
