"""`quantease quantize --target fp|q`: the asymmetric objective ||W X_fp - Ŵ X_q||² (GPTAQ) through the
pipeline's two activation streams: the algebra, the Σ it accumulates, equality with target q where no
earlier error exists, resume, bad input."""

import pytest
import torch

from pipeline_helpers import all_tensors, make_work, quantize_tiny, report
from quantease.quantize import calib, pipeline


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("target"))


quantize = quantize_tiny


def test_fp_target_weight_minimises_the_asymmetric_objective():
    """||W X_fp - Ŵ X_q||² = ||(W_eff - Ŵ) X_q||² + const for every Ŵ (damp 0), and W_eff = W when X_fp = X_q."""
    g = torch.Generator().manual_seed(0)
    n, k, t = 6, 10, 200
    w = torch.randn(n, k, generator=g)
    x_q = torch.randn(k, t, generator=g)
    x_fp = x_q + 0.3 * torch.randn(k, t, generator=g)
    sq, sfq, sfp = x_q @ x_q.T, x_fp @ x_q.T, x_fp @ x_fp.T
    w_eff = pipeline.fp_target_weight(w, sq, sfq, damp=0.0).double()
    assert not torch.allclose(w_eff, w.double())
    w64, xq64, xf64 = w.double(), x_q.double(), x_fp.double()
    gaps = []
    for _ in range(3):
        wh = torch.randn(n, k, generator=g).double()
        direct = float(((w64 @ xf64 - wh @ xq64) ** 2).sum())
        gaps.append(direct - float((((w_eff - wh) @ xq64) ** 2).sum()))
        # the reported relative error is the objective's
        rel = pipeline.fp_target_error(w, wh.float(), sq, sfq, sfp)
        assert rel == pytest.approx(direct / float(((w64 @ xf64) ** 2).sum()), rel=1e-4)
    assert max(gaps) - min(gaps) < 1e-3 * abs(gaps[0]) + 1e-6  # the same constant: W_eff is the minimiser
    assert torch.equal(pipeline.fp_target_weight(w, sq, sq.clone(), damp=0.01), w)
    # α shrinks the correction linearly toward W (GPTAQ's α)
    w_half = pipeline.fp_target_weight(w, sq, sfq, damp=0.0, alpha=0.5).double()
    torch.testing.assert_close(w_half - w64, 0.5 * (w_eff - w64), rtol=1e-4, atol=1e-6)


def test_sigmas_pair_the_fp_model_inputs_with_the_quantized_model_inputs(work, tmp_path, monkeypatch):
    """Block 1's q_proj: Σ_q from the quantized block 0's outputs, Σ_fp from the original model's, and
    Σ_fq = X_fp X_qᵀ pairs them token by token."""
    seen, real = [], pipeline.quantize_linear

    def spy(module, sigma, opts, fp_sigmas=None):
        seen.append((sigma.clone(), fp_sigmas))
        return real(module, sigma, opts, fp_sigmas)

    monkeypatch.setattr(pipeline, "quantize_linear", spy)
    out = tmp_path / "q"
    assert quantize(work, out, "--method", "gptq", "--target", "fp") == 0
    sq, (sfq, sfp) = seen[7]  # 7 linears per block, q_proj first
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from quantease.eval import load_dequantized
    qmodel = load_dequantized(out, torch.float32)
    fmodel = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=torch.float32)
    ids = calib.load(work / "calib.txt", AutoTokenizer.from_pretrained(work / "tiny"), nsamples=4, seqlen=64, seed=0)
    expect = {k: torch.zeros_like(sq) for k in ("q", "fq", "fp")}
    with torch.no_grad():
        for row in ids:
            xs = []
            for m in (qmodel, fmodel):
                hs = m(row[None], output_hidden_states=True).hidden_states[1]
                xs.append(m.model.layers[1].input_layernorm(hs).reshape(-1, hs.shape[-1]))
            xq, xf = xs
            expect["q"] += xq.T @ xq
            expect["fq"] += xf.T @ xq
            expect["fp"] += xf.T @ xf
    for got, want in ((sq, expect["q"]), (sfq, expect["fq"]), (sfp, expect["fp"])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(sq, sfp, rtol=1e-3, atol=1e-2)  # block 0's error is there to correct
    assert set(r["target"] for r in report(out)["layers"].values()) == {"fp"} and report(out)["target"] == "fp"
    assert report(out)["target_alpha"] == pipeline.TARGET_ALPHA


@pytest.mark.parametrize("flags", [[], ["--true-sequential"]])
def test_fp_target_equals_q_target_where_no_earlier_error(work, tmp_path, flags):
    """Block 0 (whole-block Σ) sees the same inputs on both streams: Σ_fq = Σ_q, so target fp quantizes it
    exactly as target q.  Later layers see the error before them, and target fp changes them."""
    args = ("--method", "quantease", "--sweeps", "2", *flags)
    assert quantize(work, tmp_path / "q", *args, "--target", "q") == 0
    assert quantize(work, tmp_path / "fp", *args, "--target", "fp") == 0
    a, b = all_tensors(tmp_path / "q"), all_tensors(tmp_path / "fp")
    same = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]  # first group: block 0's inputs only
    if not flags:
        same += ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for k in a:
        if k.startswith("model.layers.0.") and any(s in k for s in same):
            assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["model.layers.1.self_attn.q_proj.qweight"], b["model.layers.1.self_attn.q_proj.qweight"])
    if flags:  # o_proj sees the quantized q/k/v in the q stream, the fp ones in the fp stream
        key = "model.layers.0.self_attn.o_proj.qweight"
        assert not torch.equal(a[key], b[key])
    ra, rb = report(tmp_path / "q")["layers"], report(tmp_path / "fp")["layers"]
    assert ra["model.layers.0.self_attn.q_proj"]["rel_error"] == pytest.approx(
        rb["model.layers.0.self_attn.q_proj"]["rel_error"], rel=1e-4)


def test_resume_after_interrupt_gives_the_same_checkpoint_with_fp_target(work, tmp_path, monkeypatch):
    args = ("--method", "quantease", "--outliers", "0.05", "--sweeps", "2", "--target", "fp")
    clean = tmp_path / "clean"
    assert quantize(work, clean, *args) == 0
    out = tmp_path / "resumed"
    monkeypatch.setenv(pipeline.INTERRUPT_ENV, "0")
    assert quantize(work, out, *args) == 130
    assert (tmp_path / "resumed.partial/fp_inputs_0001.pt").exists()
    monkeypatch.delenv(pipeline.INTERRUPT_ENV)
    calls = []
    real = pipeline.quantize_block
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert quantize(work, out, *args) == 0
    assert calls == ["model.layers.1"]
    a, b = all_tensors(clean), all_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_partial_state_of_the_other_target_is_not_reused(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    monkeypatch.setenv(pipeline.INTERRUPT_ENV, "0")
    assert quantize(work, out, "--method", "rtn", "--target", "q") == 130
    monkeypatch.delenv(pipeline.INTERRUPT_ENV)
    assert quantize(work, out, "--method", "rtn", "--target", "fp") == 0
    assert "other settings; starting over" in capsys.readouterr().out
    assert report(out)["target"] == "fp"


def test_bad_target_is_one_line(work, tmp_path, capsys):
    out = tmp_path / "out"
    rc = quantize(work, out, "--target", "full")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["quantease quantize: error: --target full: choose one of ('fp', 'q')"]
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_bad_target_alpha_is_one_line(work, tmp_path, capsys):
    rc = quantize(work, tmp_path / "out", "--target", "fp", "--target-alpha", "1.5")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["quantease quantize: error: --target-alpha 1.5: must be in (0, 1]"]
