"""The quantized checkpoint format: pack, write, read, validate, dequantize."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_helpers import make_checkpoint, quant_config, reference_model, rtn_with_outliers, tokens
from conftest import make_tiny_llama
from quantease import cli
from quantease.errors import QuantEaseError
from quantease.format import checkpoint as ckpt
from quantease.format import layout

# hidden 80 and intermediate 144 are not multiples of 32: the padded runs and a partial last group are exercised
TINY = dict(hidden_size=80, intermediate_size=144, head_dim=20)
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_llama(tmp_path / "tiny", **TINY)


@pytest.fixture
def qdir(tiny, tmp_path):
    out = tmp_path / "q"
    layers, qc = make_checkpoint(tiny, out, bits=3, group_size=32, fraction=0.05)
    return out, layers, qc


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,sym,fraction", [(32, False, 0.05), (-1, True, 0.0), (48, False, 0.1)])
def test_pack_layer_dequantizes_to_the_weight(bits, group_size, sym, fraction):
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(bits)) * 0.02
    qw = rtn_with_outliers(w, bits, group_size, sym, fraction)
    p = ckpt.pack_layer(qw, fraction)
    spec = ckpt.layer_spec(24, 100, dict(bits=bits, group_size=group_size, sym=sym, outlier_fraction=fraction),
                           has_bias=False)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in p.items()} == spec
    got = layout.dequantize_packed(p["qweight"], p["scales"], p.get("zeros"), p.get("outlier_idx"),
                                   p.get("outlier_val"), bits, group_size, 100)
    # the stored scales are fp16: with the same rounding the packed layer is exactly the QuantizedWeight
    assert torch.equal(got, replace(qw, scale=qw.scale.half().float()).dequantize())


def test_pack_layer_pads_missing_outliers_and_rejects_wrong_width():
    qw = rtn_with_outliers(torch.randn(8, 64), fraction=0.0)
    p = ckpt.pack_layer(qw, 0.05)  # R = 3 zero slots
    assert p["outlier_idx"].shape == (8, 3) and p["outlier_idx"].dtype == torch.int16
    assert not p["outlier_val"].any()
    with pytest.raises(QuantEaseError, match="outlier slots per row"):
        ckpt.pack_layer(rtn_with_outliers(torch.randn(8, 64), fraction=0.1), 0.05)


def test_write_read_roundtrip(qdir, tiny):
    out, layers, qc = qdir
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "quantease_report.json"]
    config, got_qc, tensors = ckpt.read_checkpoint(out)
    assert got_qc["quant_method"] == "quantease" and got_qc["format_version"] == 1
    assert (got_qc["bits"], got_qc["group_size"], got_qc["sym"], got_qc["outlier_fraction"]) == (3, 32, False, 0.05)
    assert got_qc["modules_to_not_convert"] == ["lm_head"] and got_qc["method"] == "rtn"
    assert config["hidden_size"] == 80 and config["model_type"] == "llama"
    for name, qw in layers.items():
        packed = ckpt.pack_layer(qw, 0.05)
        for suffix, t in packed.items():
            assert torch.equal(tensors[f"{name}.{suffix}"], t), f"{name}.{suffix}"
        assert f"{name}.weight" not in tensors
    assert torch.equal(tensors["lm_head.weight"], load_file(tiny / "model.safetensors")["lm_head.weight"])
    # bits/weight: the weighted mean of the layers' honest storage cost
    n_k = {name: qw.shape[0] * qw.shape[1] for name, qw in layers.items()}
    expect = sum(qw.bits_per_weight * n_k[name] for name, qw in layers.items()) / sum(n_k.values())
    assert got_qc["bits_per_weight"] == pytest.approx(expect)
    report = json.loads((out / "quantease_report.json").read_text())
    # by hand for q_proj [80, 80]: codes 96 padded columns * 3 bits, 3 groups * (16-bit scale + 8-bit zero),
    # R = 4 outlier slots * (16-bit value + 16-bit index), per row of 80 weights
    assert report["layers"][Q]["bits_per_weight"] == pytest.approx((96 * 3 + 3 * 24 + 4 * 32) / 80)
    assert report["method"] == "rtn" and report["quantease_version"] == got_qc["quantease_version"]
    assert report["layers"][Q]["rel_error"] == pytest.approx(layers[Q].info["rel_error"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["quant_method"] == "quantease" and meta["format"] == "pt"


def test_report_merges_caller_fields(tiny, tmp_path):
    out = tmp_path / "q"
    make_checkpoint(tiny, out, report={"sweeps": 7, "calibration": {"source": "c4", "nsamples": 4},
                                       "layers": {Q: {"seconds": 1.5}}})
    report = json.loads((out / "quantease_report.json").read_text())
    assert report["sweeps"] == 7 and report["calibration"]["nsamples"] == 4
    assert report["layers"][Q]["seconds"] == 1.5 and "bits_per_weight" in report["layers"][Q]


def test_sharded_write(tiny, tmp_path):
    out = tmp_path / "q"
    layers, _ = make_checkpoint(tiny, out, max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    _, _, tensors = ckpt.read_checkpoint(out)
    assert torch.equal(tensors[f"{Q}.qweight"], ckpt.pack_layer(layers[Q])["qweight"])


def test_partial_quantization_lists_the_rest(tiny, tmp_path):
    out = tmp_path / "q"
    make_checkpoint(tiny, out, only=lambda n: n.startswith("model.layers.1."))
    _, qc, tensors = ckpt.read_checkpoint(out)
    assert "model.layers.0.mlp.up_proj" in qc["modules_to_not_convert"]
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    assert "model.layers.1.mlp.up_proj.qweight" in tensors


# ---------------------------------------------------------------- bad inputs: one QuantEaseError each

def rewrite(path, fn):
    t = load_file(path)
    fn(t)
    save_file(t, path, {"format": "pt"})


def edit_config(out, **qc_changes):
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].update(qc_changes)
    (out / "config.json").write_text(json.dumps(cfg))


def corrupt_truncate(out):
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def corrupt_missing(out):
    rewrite(out / "model.safetensors", lambda t: t.pop(f"{Q}.scales"))


def corrupt_extra(out):
    rewrite(out / "model.safetensors", lambda t: t.update({f"{Q}.weight": torch.zeros(80, 80)}))


def corrupt_dtype(out):
    rewrite(out / "model.safetensors", lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].float()}))


def corrupt_nan_scale(out):
    rewrite(out / "model.safetensors", lambda t: t[f"{Q}.scales"].__setitem__((1, 0), float("nan")))


def corrupt_inf_outlier(out):
    rewrite(out / "model.safetensors", lambda t: t[f"{Q}.outlier_val"].__setitem__((2, 0), float("inf")))


def corrupt_outlier_range(out):
    rewrite(out / "model.safetensors", lambda t: t[f"{Q}.outlier_idx"].__setitem__((0, 0), 80))


def corrupt_outlier_order(out):
    def fn(t):
        t[f"{Q}.outlier_idx"][3] = torch.tensor([50, 10, 60, 70], dtype=torch.int16)
    rewrite(out / "model.safetensors", fn)


def corrupt_zero_range(out):
    rewrite(out / "model.safetensors", lambda t: t[f"{Q}.zeros"].__setitem__((0, 0), 8))


BAD = {
    "truncated": (corrupt_truncate, r"model\.safetensors: not a readable safetensors file"),
    "missing tensor": (corrupt_missing, rf"tensor '{Q}\.scales' is missing"),
    "unexpected tensor": (corrupt_extra, rf"unexpected tensor '{Q}\.weight'"),
    "wrong dtype": (corrupt_dtype, rf"tensor '{Q}\.scales' has dtype F32, expected torch.float16"),
    "wrong bits": (lambda o: edit_config(o, bits=4), rf"tensor '.*\.qweight' has shape"),
    "wrong group_size": (lambda o: edit_config(o, group_size=16), rf"tensor '.*\.scales' has shape"),
    "wrong outlier_fraction": (lambda o: edit_config(o, outlier_fraction=0.1), r"\.outlier_idx' has shape"),
    "wrong sym": (lambda o: edit_config(o, sym=True), r"unexpected tensor '.*\.zeros'"),
    "unknown format_version": (lambda o: edit_config(o, format_version=2), r"format_version 2 is not supported"),
    "unknown quant_method": (lambda o: edit_config(o, quant_method="gptq"), r"quant_method is 'gptq'"),
    "bits not supported": (lambda o: edit_config(o, bits=5), r"bits=5 is not one of"),
    "NaN scale": (corrupt_nan_scale, rf"model\.safetensors: tensor '{Q}\.scales' has NaN/Inf"),
    "Inf outlier": (corrupt_inf_outlier, rf"tensor '{Q}\.outlier_val' has NaN/Inf"),
    "outlier index out of range": (corrupt_outlier_range, rf"tensor '{Q}\.outlier_idx' has column indices outside"),
    "outlier indices not sorted": (corrupt_outlier_order, rf"'{Q}\.outlier_idx' is not non-decreasing"),
    "zero out of range": (corrupt_zero_range, rf"'{Q}\.zeros' has values above 7"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_one_error(qdir, case):
    out = qdir[0]
    corrupt, pattern = BAD[case]
    corrupt(out)
    with pytest.raises(QuantEaseError, match=pattern):
        ckpt.read_checkpoint(out)


def test_bad_shard_index(tiny, tmp_path):
    out = tmp_path / "q"
    make_checkpoint(tiny, out, max_shard_size=40_000)
    index_path = out / "model.safetensors.index.json"
    good = index_path.read_text()
    index = json.loads(good)
    shard = index["weight_map"].pop(f"{Q}.zeros")
    index_path.write_text(json.dumps(index))
    with pytest.raises(QuantEaseError, match=rf"{shard}: tensor '{Q}\.zeros' is not listed for this file"):
        ckpt.read_checkpoint(out)
    index_path.write_text(good)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(QuantEaseError, match=f"lists {shard.name}, which is missing"):
        ckpt.read_checkpoint(out)


def test_not_a_checkpoint(tiny, tmp_path):
    with pytest.raises(QuantEaseError, match="quantization_config: missing or not an object"):
        ckpt.read_checkpoint(tiny)
    with pytest.raises(QuantEaseError, match="no config.json"):
        ckpt.read_checkpoint(tmp_path)


def test_writer_rejects_mismatched_layers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    qw = rtn_with_outliers(model.get_submodule(Q).weight, bits=3)
    with pytest.raises(QuantEaseError, match="bits=3 but quant_config has bits=4"):
        ckpt.write_checkpoint(tmp_path / "a", model, {Q: qw}, quant_config=quant_config(bits=4))
    with pytest.raises(QuantEaseError, match=r"quantized shape \[80, 80\] != linear \[out, in\] \[144, 80\]"):
        ckpt.write_checkpoint(tmp_path / "b", model, {"model.layers.0.mlp.up_proj": qw}, quant_config=quant_config())
    with pytest.raises(QuantEaseError, match=rf"{Q}: 4 outlier slots per row, but outlier_fraction=0.0 gives R=0"):
        with_outliers = rtn_with_outliers(model.get_submodule(Q).weight, fraction=0.05)
        ckpt.write_checkpoint(tmp_path / "d", model, {Q: with_outliers}, quant_config=quant_config(fraction=0.0))
    with pytest.raises(QuantEaseError, match="not a linear layer"):
        ckpt.write_checkpoint(tmp_path / "c", model, {"model.norm": qw}, quant_config=quant_config())
    assert not list(tmp_path.glob("[abcd]*")) and not list(tmp_path.glob(".*"))


def test_existing_output(qdir, tiny):
    out = qdir[0]
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(QuantEaseError, match="already exists"):
        make_checkpoint(tiny, out, bits=4)
    assert (out / "model.safetensors").read_bytes() == before
    make_checkpoint(tiny, out, bits=4, overwrite=True)
    assert ckpt.read_checkpoint(out)[1]["bits"] == 4
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_write_leaves_no_checkpoint(tiny, tmp_path, monkeypatch, overwrite):
    out = tmp_path / "q"
    if overwrite:
        make_checkpoint(tiny, out, bits=4)
    before = sorted(p.name for p in tmp_path.iterdir())
    real = ckpt.write_shards

    def write_then_fail(out_dir, *args, **kwargs):
        real(out_dir, *args, **kwargs)  # the weights are on disk in the temporary folder when it fails
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_shards", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(tiny, out, bits=3, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary sibling left either
    if overwrite:
        assert ckpt.read_checkpoint(out)[1]["bits"] == 4  # the old checkpoint is untouched


# ---------------------------------------------------------------- quantease dequantize

def test_dequantize_cli(qdir, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out, layers, qc = qdir
    dense = tmp_path / "dense"
    assert cli.main(["dequantize", str(out), str(dense)]) == 0
    cfg = json.loads((dense / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert load_file(dense / "model.safetensors")[f"{Q}.weight"].dtype == torch.float16
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    ref = reference_model(tiny, layers, qc, weight_dtype=torch.float16)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)


def test_dequantize_cli_errors(qdir, tmp_path, capsys):
    out = qdir[0]
    assert cli.main(["dequantize", str(out), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    corrupt_nan_scale(out)
    assert cli.main(["dequantize", str(out), str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantease dequantize: error:") and "scales' has NaN/Inf" in err and "\n" not in err
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- per-module overrides (a 4-bit lm_head)

def head_checkpoint(tiny, out):
    """The tiny model's block linears at 3 bits + 5% outliers, its lm_head at 4 bits without outliers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float16)
    layers = {name: rtn_with_outliers(m.weight, 3, 32, False, 0.05) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    layers["lm_head"] = rtn_with_outliers(model.lm_head.weight, 4, 32)
    qc = dict(quant_config(3, 32, False, 0.05), overrides={"lm_head": {"bits": 4, "outlier_fraction": 0.0}})
    ckpt.write_checkpoint(out, model, layers, quant_config=qc)
    return model, layers


def test_overrides_give_the_lm_head_its_own_grid(tiny, tmp_path):
    model, layers = head_checkpoint(tiny, tmp_path / "q")
    config, qc, quantized, tensors = ckpt.validate_checkpoint(tmp_path / "q")
    assert "lm_head" in quantized and qc["modules_to_not_convert"] == []
    vocab = model.lm_head.weight.shape[0]
    assert tensors["lm_head.qweight"].shape == (vocab, 96 // 32 * 4)  # K = 80 padded to 96, 4 words a run
    assert "lm_head.outlier_idx" not in tensors and f"{Q}.outlier_idx" in tensors
    assert tensors[f"{Q}.qweight"].shape[1] == 96 // 32 * 3
    _, dense = ckpt.dequantized_tensors(tmp_path / "q", dtype=torch.float32)
    torch.testing.assert_close(dense["lm_head.weight"], layers["lm_head"].dequantize(), rtol=0, atol=2e-3)


def test_a_tied_lm_head_is_stored_untied(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True, **TINY)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    model.lm_head.weight = torch.nn.Parameter(emb.clone())  # the pipeline unties before it quantizes
    qc = dict(quant_config(), overrides={"lm_head": {"bits": 4}})
    ckpt.write_checkpoint(tmp_path / "q", model, {"lm_head": rtn_with_outliers(emb, 4, 32)}, quant_config=qc)
    config, _, quantized, tensors = ckpt.validate_checkpoint(tmp_path / "q")
    assert config["tie_word_embeddings"] is False and set(quantized) == {"lm_head"}
    assert torch.equal(tensors["model.embed_tokens.weight"], emb)


@pytest.mark.parametrize("overrides, pattern", [
    ({"lm_head": {"bits": 5}}, r"overrides\['lm_head'\]: bits=5 is not one of"),
    ({"lm_head": {"color": 1}}, r"overrides\['lm_head'\] must be an object with keys among"),
    ({"lm_head": 4}, r"overrides\['lm_head'\] must be an object"),
    ([4], r"overrides must be an object"),
])
def test_bad_overrides_one_error(qdir, overrides, pattern):
    edit_config(qdir[0], overrides=overrides)
    with pytest.raises(QuantEaseError, match=pattern):
        ckpt.read_checkpoint(qdir[0])


def test_override_that_does_not_match_the_tensors(tiny, tmp_path):
    head_checkpoint(tiny, tmp_path / "q")
    edit_config(tmp_path / "q", overrides={"lm_head": {"bits": 3, "outlier_fraction": 0.0}})
    with pytest.raises(QuantEaseError, match=r"tensor 'lm_head\.qweight' has shape"):
        ckpt.read_checkpoint(tmp_path / "q")


def test_writer_checks_overrides(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    qw = rtn_with_outliers(model.lm_head.weight, bits=4)
    with pytest.raises(QuantEaseError, match="lm_head: bits=4 but quant_config has bits=3"):
        ckpt.write_checkpoint(tmp_path / "a", model, {"lm_head": qw}, quant_config=quant_config())
    qc = dict(quant_config(), overrides={"lm_head": {"bits": 4}, "model.norm": {"bits": 4}})
    with pytest.raises(QuantEaseError, match="overrides 'model.norm', which is not a quantized layer"):
        ckpt.write_checkpoint(tmp_path / "b", model, {"lm_head": qw}, quant_config=qc)
    assert not list(tmp_path.glob("[ab]*"))
