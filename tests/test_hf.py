"""Loading quantease checkpoints in transformers: from_pretrained, runtime.load, QuantEaseLinear."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quantease.runtime
from ckpt_helpers import make_checkpoint, reference_model, tokens
from conftest import ROOT, make_tiny_llama
from quantease.errors import QuantEaseError
from quantease.format import checkpoint as ckpt
from quantease.runtime import linear as rlinear
from quantease.runtime.linear import QuantEaseLinear
from test_checkpoint import TINY, corrupt_missing, corrupt_nan_scale, corrupt_outlier_range, edit_config

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_llama(tmp_path / "tiny", **TINY)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("bits,group_size,sym,fraction", [(3, 32, False, 0.05), (4, -1, True, 0.0),
                                                          (2, 64, False, 0.02)])
def test_from_pretrained_matches_dequantized(tiny, tmp_path, bits, group_size, sym, fraction):
    out = tmp_path / "q"
    layers, qc = make_checkpoint(tiny, out, bits=bits, group_size=group_size, sym=sym, fraction=fraction)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = reference_model(tiny, layers, qc)
    x = tokens()
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    for name in layers:
        m = model.get_submodule(name)
        assert isinstance(m, QuantEaseLinear) and (m.bits, m.group_size) == (bits, group_size)
        assert not hasattr(m, "weight") and m.qweight.dtype == torch.int32 and m.scales.dtype == torch.float16
        assert (m.zeros is None) == sym and (m.outlier_idx is None) == (fraction == 0)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.config.quantization_config.bits == bits


def test_loaded_buffers_equal_the_file(tiny, tmp_path):
    out = tmp_path / "q"
    make_checkpoint(tiny, out)
    stored = load_file(out / "model.safetensors")
    # bf16 activations: transformers would cast float tensors to bf16, the quantizer keeps scales exact fp16
    model = quantease.runtime.load(out, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, m in model.named_modules():
        if isinstance(m, QuantEaseLinear):
            for suffix in ("qweight", "scales", "zeros", "outlier_idx", "outlier_val"):
                assert torch.equal(getattr(m, suffix), stored[f"{name}.{suffix}"]), f"{name}.{suffix}"
    assert logits(model, tokens()).dtype == torch.bfloat16


def test_sharded_checkpoint_loads(tiny, tmp_path):
    out = tmp_path / "q"
    layers, qc = make_checkpoint(tiny, out, max_shard_size=40_000)
    assert (out / "model.safetensors.index.json").exists()
    x = tokens()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), x),
                               logits(reference_model(tiny, layers, qc), x), rtol=1e-5, atol=1e-5)


def test_linears_replaced_on_meta_before_weights_load(tiny, tmp_path, monkeypatch):
    out = tmp_path / "q"
    make_checkpoint(tiny, out)
    seen = []
    real = rlinear.replace_linears

    def spy(model, qc):
        seen.extend(p.device.type for n, p in model.named_parameters() if n.endswith("proj.weight"))
        return real(model, qc)

    monkeypatch.setattr(quantease.runtime.hf, "replace_linears", spy)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert seen and set(seen) == {"meta"}  # the dense weights never existed
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())


BAD = {
    "missing tensor": (corrupt_missing, rf"tensor '{Q}\.scales' is missing"),
    "wrong bits": (lambda o: edit_config(o, bits=4), r"\.qweight' has shape"),
    "unknown format_version": (lambda o: edit_config(o, format_version=2), "format_version 2 is not supported"),
    "NaN scale": (corrupt_nan_scale, rf"model\.safetensors: tensor '{Q}\.scales' has NaN/Inf"),
    "outlier index out of range": (corrupt_outlier_range, rf"'{Q}\.outlier_idx' has column indices outside"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_from_pretrained_rejects_bad_checkpoints(tiny, tmp_path, case):
    out = tmp_path / "q"
    make_checkpoint(tiny, out)
    corrupt, pattern = BAD[case]
    corrupt(out)
    with pytest.raises(QuantEaseError, match=pattern):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_load_rejects_unknown_quant_method(tiny, tmp_path):
    out = tmp_path / "q"
    make_checkpoint(tiny, out)
    assert quantease.runtime.is_quantized(out) and not quantease.runtime.is_quantized(tiny)
    edit_config(out, quant_method="quantease2")  # transformers alone would ignore it and load garbage
    with pytest.raises(QuantEaseError, match="quant_method is 'quantease2'"):
        quantease.runtime.load(out)


def test_save_pretrained_roundtrip(tiny, tmp_path):
    out = tmp_path / "q"
    make_checkpoint(tiny, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    model.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "quantease"
    ckpt.validate_checkpoint(tmp_path / "again")
    x = tokens()
    a = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    torch.testing.assert_close(logits(a, x), logits(b, x), rtol=0, atol=0)


def test_import_registers_lazily(tiny, tmp_path):
    """`import quantease.runtime` pulls in neither torch nor transformers, yet from_pretrained works after it."""
    out = tmp_path / "q"
    make_checkpoint(tiny, out)
    code = ("import sys, quantease.runtime\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "print(type(m.model.layers[0].mlp.up_proj).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "QuantEaseLinear"


@pytest.mark.slow
def test_smollm2_roundtrip(smollm2_dir, tmp_path):
    """SmolLM2-135M (tied embeddings): the first block quantized with RTN + outliers, the rest left fp16."""
    from transformers import AutoTokenizer

    out = tmp_path / "q"
    layers, qc = make_checkpoint(smollm2_dir, out, bits=3, group_size=128, fraction=0.005,
                                 only=lambda n: n.startswith("model.layers.0."))
    assert len(layers) == 7
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    x = AutoTokenizer.from_pretrained(out)("The capital of France is", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = reference_model(smollm2_dir, layers, qc)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-4, atol=1e-4)
    # the dequantized fp16 folder loads in plain transformers and gives the same logits as fp16-rounded weights
    from quantease import cli

    assert cli.main(["dequantize", str(out), str(tmp_path / "dense")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    for name in layers:
        w = ref.get_submodule(name).weight
        w.data = w.data.half().float()
    torch.testing.assert_close(logits(dense, x), logits(ref, x), rtol=1e-4, atol=1e-4)


def test_linear_bias(tmp_path):
    src = make_tiny_llama(tmp_path / "tiny", attention_bias=True, **TINY)
    model = AutoModelForCausalLM.from_pretrained(src)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):  # random biases: the init makes them zero
            p.data = torch.randn_like(p) * 0.1
    model.save_pretrained(src)
    out = tmp_path / "q"
    layers, qc = make_checkpoint(src, out)
    stored = load_file(out / "model.safetensors")
    assert stored[f"{Q}.bias"].dtype == torch.float16 and stored[f"{Q}.bias"].abs().sum() > 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.get_submodule(Q).bias is not None
    x = tokens()
    torch.testing.assert_close(logits(model, x), logits(reference_model(src, layers, qc), x), rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d(tmp_path):
    """GPT-2 keeps its linears as transformers Conv1D (weight [in, out]); the quantize pipeline hands the writer
    nn.Linear stand-ins, and the loader swaps the Conv1D modules."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from ckpt_helpers import quant_config, rtn_with_outliers

    torch.manual_seed(0)
    src = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).half().save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    layers = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            linear = torch.nn.Linear(*m.weight.shape, dtype=m.weight.dtype)
            linear.weight.data, linear.bias.data = m.weight.data.t().contiguous(), m.bias.data
            model.set_submodule(name, linear)
            layers[name] = rtn_with_outliers(linear.weight, fraction=0.05)
    qc = quant_config(fraction=0.05)
    ckpt.write_checkpoint(tmp_path / "q", model, layers, quant_config=qc)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert isinstance(q.transformer.h[0].attn.c_attn, QuantEaseLinear)
    assert q.lm_head.weight.data_ptr() == q.transformer.wte.weight.data_ptr()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, qw in layers.items():
        p = ckpt.pack_layer(qw, 0.05)
        w = ckpt.layout.dequantize_packed(p["qweight"], p["scales"], p["zeros"], p["outlier_idx"], p["outlier_val"],
                                          3, 32, qw.shape[1])
        ref.get_submodule(name).weight.data = w.t().contiguous()
    x = tokens()
    torch.testing.assert_close(logits(q, x), logits(ref, x), rtol=1e-5, atol=1e-5)


def test_dtype_cast_keeps_scales_exact(tiny, tmp_path):
    out = tmp_path / "q"
    make_checkpoint(tiny, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    before = model.get_submodule(Q).scales.clone()
    model.to(torch.bfloat16)
    m = model.get_submodule(Q)
    assert m.scales.dtype == torch.float16 and torch.equal(m.scales, before)
    assert m.outlier_val.dtype == torch.float16 and m.bias is None
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_importing_hf_module_first_registers():
    # importing the integration module before transformers' registry used to recurse into a half-imported module
    code = ("import quantease.runtime.hf; import transformers.quantizers.auto as a; "
            "assert 'quantease' in a.AUTO_QUANTIZER_MAPPING and 'quantease' in a.AUTO_QUANTIZATION_CONFIG_MAPPING")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
