"""The checkpoint as the server sees it: the startup check and the GET /v1/quantization report.

No vLLM import here: `quantease serve` runs validate() before vLLM spins up, so a bad checkpoint stops startup
with one line.
"""
import json
from pathlib import Path

from quantease.errors import QuantEaseError
from quantease.format import checkpoint as ckpt
from quantease.format import layout

REPORT_KEYS = ("method", "bits", "group_size", "sym", "outlier_fraction", "structured_outliers",
               "modules_to_not_convert", "overrides", "format_version")


def validate(folder):
    """(config, quantization_config, {prefix: (N, K)}) of a checked checkpoint; QuantEaseError otherwise.

    Headers, shapes, dtypes and the values of every quantized layer (format.checkpoint.validate_checkpoint)."""
    if not Path(folder).is_dir():
        raise QuantEaseError(f"{folder}: no such checkpoint folder")
    config, qc, quantized, _ = ckpt.validate_checkpoint(folder, content=True)
    return config, qc, quantized


def stored_bits_per_weight(folder, quantized):
    """Bits stored per weight of the quantized linears (codes, scales, zeros, outlier slots), from the headers."""
    sizes = {}
    for path in sorted(set(ckpt.weight_files(folder).values())):
        for name, (dtype, shape) in ckpt.read_header(path).items():
            prefix, _, suffix = name.rpartition(".")
            if prefix in quantized and suffix in layout.TENSORS:
                numel = 1
                for d in shape:
                    numel *= d
                sizes[prefix] = sizes.get(prefix, 0) + numel * ckpt.SAFE_DTYPES[dtype].itemsize * 8
    weights = sum(n * k for n, k in quantized.values())
    return sum(sizes.values()) / weights if weights else 0.0


def report(folder):
    """What GET /v1/quantization returns: quantization_config, bits/weight, quantease_report.json if present."""
    config, qc, quantized, _ = ckpt.validate_checkpoint(folder, content=False)
    out = {"quant_method": ckpt.QUANT_METHOD, **{k: qc.get(k) for k in REPORT_KEYS},
           "quantized_layers": len(quantized),
           "bits_per_weight": round(stored_bits_per_weight(folder, quantized), 4)}
    path = Path(folder) / ckpt.REPORT_FILE
    rep = {}
    if path.exists():
        try:
            rep = json.loads(path.read_text())
        except ValueError as e:
            raise QuantEaseError(f"{path}: not valid JSON ({e})") from None
    # per-layer errors etc. as the quantizer wrote them; None when the checkpoint has no report file
    out["layers"] = rep.get("layers") if isinstance(rep, dict) else None
    out["report"] = rep or None
    return out
