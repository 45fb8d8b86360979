"""Quantized checkpoints for the format/runtime tests: RTN grids from quantize_weight plus ELL outliers."""
from dataclasses import replace

import torch

from quantease.format import checkpoint as ckpt
from quantease.format import layout
from quantease.quantize import quantize_weight


def rtn_with_outliers(w, bits=3, group_size=32, sym=False, fraction=0.0):
    """RTN on a min-max grid, then the R largest residuals of each row as fp16 outliers (sorted, one padded slot)."""
    w = w.detach().to(torch.float32)
    k = w.shape[1]
    qw = quantize_weight(w, torch.eye(k), bits=bits, method="rtn", group_size=group_size, sym=sym)
    r = layout.outlier_slots(k, fraction)
    if r == 0:
        return qw
    resid = w - qw.grid_weight()
    idx = resid.abs().topk(r, dim=1).indices.sort(dim=1).values
    val = torch.gather(resid, 1, idx).to(torch.float16)
    if r >= 2:  # an unused slot, as the ELL layout pads: value 0, repeats the row's previous index
        idx[0, -1], val[0, -1] = idx[0, -2], 0
    return replace(qw, outlier_idx=idx, outlier_val=val)


def quantize_model(model, bits=3, group_size=32, sym=False, fraction=0.0, only=None):
    """{name: QuantizedWeight} for every nn.Linear but lm_head (or the names `only` picks)."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head" and (only is None or only(name)):
            layers[name] = rtn_with_outliers(m.weight, bits, group_size, sym, fraction)
    return layers


def quant_config(bits=3, group_size=32, sym=False, fraction=0.0):
    return dict(bits=bits, group_size=group_size, sym=sym, outlier_fraction=fraction, structured_outliers=False,
                method="rtn")


def reference_model(src, layers, qc, dtype=torch.float32, weight_dtype=torch.float32):
    """The original model with the checkpoint's dequantized weights loaded into it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    for name, qw in layers.items():
        p = ckpt.pack_layer(qw, qc["outlier_fraction"])
        w = layout.dequantize_packed(p["qweight"], p["scales"], p.get("zeros"), p.get("outlier_idx"),
                                     p.get("outlier_val"), qw.bits, qw.group_size, qw.shape[1])
        model.get_submodule(name).weight.data = w.to(weight_dtype).to(dtype)
    return model.eval()


def make_checkpoint(src, out, bits=3, group_size=32, sym=False, fraction=0.05, **kwargs):
    """Quantize the HF folder `src` with RTN(+outliers) and write it to `out`; returns (layers, quant_config)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    layers = quantize_model(model, bits, group_size, sym, fraction, only=kwargs.pop("only", None))
    qc = quant_config(bits, group_size, sym, fraction)
    ckpt.write_checkpoint(out, model, layers, quant_config=qc, source_dir=src, **kwargs)
    return layers, qc


def tokens(n=2, t=12, vocab=256, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
