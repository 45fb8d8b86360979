"""`quantease quantize`: end to end on tiny models of every supported family, the sequential (GPTQ)
convention, resume, and every bad input as one line with nothing written."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline_helpers import (all_tensors, corpus, family_config, make_family, make_work, quantize_tiny,
                              report)
from quantease.cli import main
from quantease.errors import QuantEaseError
from quantease.format.checkpoint import dequantized_tensors
from quantease.quantize import calib, discover, pipeline

FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "opt", "gpt2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("pipeline"))


quantize = quantize_tiny


@pytest.fixture(scope="module")
def rtn_ckpt(work):
    out = work / "rtn"
    assert quantize(work, out, "--method", "rtn", "--bits", "4") == 0
    return out


@pytest.fixture(scope="module")
def qe_ckpt(work):
    out = work / "qe"
    assert quantize(work, out, "--method", "quantease", "--bits", "4", "--outliers", "0.05", "--sweeps", "4") == 0
    return out


def test_rtn_checkpoint_holds_rtn_of_every_block_linear(work, rtn_ckpt):
    from quantease.quantize import quantize_weight

    qc = json.loads((rtn_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quantease" and qc["bits"] == 4 and qc["method"] == "rtn"
    assert "lm_head" in qc["modules_to_not_convert"]
    src = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=torch.float32)
    _, dense = dequantized_tensors(rtn_ckpt, dtype=torch.float32)
    names = [n for n, m in src.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(names) == 14
    for name in names:
        w = src.get_submodule(name).weight.data
        qw = quantize_weight(w, torch.eye(w.shape[1]), bits=4, method="rtn")
        qw.scale = qw.scale.half().float()
        torch.testing.assert_close(dense[f"{name}.weight"], qw.dequantize(), rtol=0, atol=0)
    # unquantized parts are untouched
    torch.testing.assert_close(dense["lm_head.weight"].float(), src.lm_head.weight.data)
    torch.testing.assert_close(dense["model.embed_tokens.weight"].float(), src.model.embed_tokens.weight.data)
    rows = report(rtn_ckpt)["layers"]
    assert set(rows) == set(names)
    assert all(0 < r["rel_error"] < 0.1 and r["seconds"] >= 0 for r in rows.values())


def test_quantease_with_outliers_beats_rtn_layer_by_layer(work, rtn_ckpt, qe_ckpt):
    qc = json.loads((qe_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["outlier_fraction"] == 0.05
    tensors = all_tensors(qe_ckpt)
    assert tensors["model.layers.0.mlp.down_proj.outlier_val"].shape == (64, 6)  # floor(0.05 * 128) slots
    qe, rtn = report(qe_ckpt)["layers"], report(rtn_ckpt)["layers"]
    assert all(r["outliers"] > 0 for r in qe.values())
    # block 0 sees the same inputs in both runs: the errors compare like for like there
    for name in [n for n in qe if ".layers.0." in n]:
        assert qe[name]["rel_error"] < rtn[name]["rel_error"], name


def test_eval_runs_on_the_quantized_checkpoint(work, qe_ckpt, capsys):
    rc = main(["eval", str(qe_ckpt), "--data", str(work / "calib.txt"), "--seqlen", "64", "--limit", "3", "--dense"])
    assert rc == 0
    assert "ppl" in capsys.readouterr().out


def test_quantized_checkpoint_loads_through_the_runtime(work, qe_ckpt):
    import quantease.runtime as runtime
    if not hasattr(runtime, "load"):
        pytest.skip("quantease.runtime.load is not in the tree yet (issue: runtime)")
    from quantease.eval import evaluate
    a = evaluate(qe_ckpt, work / "calib.txt", seqlen=64, limit=3, device="cpu")
    b = evaluate(qe_ckpt, work / "calib.txt", seqlen=64, limit=3, device="cpu", dense=True)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-3)


def test_block_inputs_come_from_the_quantized_earlier_blocks(work, monkeypatch, tmp_path):
    """GPTQ convention: Σ of block 1's q_proj is XᵀX of input_layernorm(output of the *quantized* block 0)."""
    import quantease.quantize as qz
    seen, real = {}, qz.quantize_weight

    def spy(w, sigma, **kw):
        seen.setdefault(len(seen), sigma.clone())
        return real(w, sigma, **kw)

    monkeypatch.setattr(qz, "quantize_weight", spy)
    out = tmp_path / "q"
    assert quantize(work, out, "--method", "gptq") == 0
    sigma_block1_q = seen[7]  # linears in order: 7 per block, q_proj first
    from quantease.eval import load_dequantized
    model = load_dequantized(out, torch.float32)
    tok_ids = calib.load(work / "calib.txt", _tok(work), nsamples=4, seqlen=64, seed=0)
    expect = torch.zeros_like(sigma_block1_q)
    with torch.no_grad():
        for row in tok_ids:
            hs = model(row[None], output_hidden_states=True).hidden_states[1]  # after block 0
            x = model.model.layers[1].input_layernorm(hs).reshape(-1, hs.shape[-1])
            expect += x.T @ x
    torch.testing.assert_close(sigma_block1_q, expect, rtol=1e-4, atol=1e-3)


def _tok(work):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(work / "tiny")


def test_true_sequential_recomputes_sigma_after_each_group(work, monkeypatch, tmp_path):
    import quantease.quantize as qz
    runs = []
    real = qz.quantize_weight

    def spy(w, sigma, **kw):
        runs[-1].append(sigma.clone())
        return real(w, sigma, **kw)

    monkeypatch.setattr(qz, "quantize_weight", spy)
    for flag in ([], ["--true-sequential"]):
        runs.append([])
        assert quantize(work, tmp_path / f"q{len(runs)}", "--method", "gptq", *flag) == 0
    plain, seq = runs
    # q/k/v see the block input in both; o_proj (index 3) sees quantized q/k/v only in true-sequential
    torch.testing.assert_close(plain[0], seq[0], rtol=0, atol=0)
    assert not torch.allclose(plain[3], seq[3])


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_and_quantize_each_family(tmp_path, family, work):
    if family == "llama":
        path = work / "tiny"
        name, groups = "model.layers", None
    else:
        path = make_family(tmp_path / family, family)
        _, name, groups = family_config(family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    found, blocks = discover.find_blocks(model)
    assert found == name and len(blocks) == 2
    if groups is not None:
        hs = torch.randn(1, 8, model.config.get_text_config().hidden_size)
        calls = pipeline.block_call_args(model, blocks, torch.arange(8)[None], torch.device("cpu"))
        assert discover.linear_groups(blocks[0], lambda: pipeline.run_block(blocks[0], hs, calls[0], "cpu")) == groups
    out = tmp_path / "q"
    # --lm-head: the final norm between the last block and the lm_head is found in every family
    rc = main(["quantize", str(path), "--out", str(out), "--calib", str(work / "calib.txt"), "--nsamples", "4",
               "--seqlen", "64", "--method", "rtn", "--bits", "8", "--lm-head", "8"])
    assert rc == 0
    assert "lm_head" in report(out)["layers"]
    from quantease.eval import evaluate
    fp = evaluate(path, work / "calib.txt", seqlen=64, limit=3, device="cpu")["ppl"]
    q = evaluate(out, work / "calib.txt", seqlen=64, limit=3, device="cpu", dense=True)["ppl"]
    assert q == pytest.approx(fp, rel=0.01)  # 8-bit RTN: the same model up to rounding
    rt = evaluate(out, work / "calib.txt", seqlen=64, limit=3, device="cpu")["ppl"]  # through quantease.runtime
    assert rt == pytest.approx(q, rel=1e-3)


def test_no_block_stack_is_a_clear_error():
    with pytest.raises(QuantEaseError, match="no stack of transformer blocks"):
        discover.find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("after, head", [(0, ()), (1, ("--lm-head", "4"))])
def test_resume_after_interrupt_gives_the_same_checkpoint(work, tmp_path, monkeypatch, after, head):
    args = ("--method", "quantease", "--outliers", "0.05", "--sweeps", "3", *head)
    clean = tmp_path / "clean"
    assert quantize(work, clean, *args) == 0
    out = tmp_path / "resumed"
    monkeypatch.setenv(pipeline.INTERRUPT_ENV, str(after))
    assert quantize(work, out, *args) == 130  # interrupted after block `after` (1: the last, before the lm_head)
    assert not out.exists()
    state = json.loads((tmp_path / "resumed.partial/state.json").read_text())
    assert state["next_block"] == after + 1
    monkeypatch.delenv(pipeline.INTERRUPT_ENV)
    calls = []
    real = pipeline.quantize_block
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert quantize(work, out, *args) == 0
    assert calls == ["model.layers.1"][after:]  # committed blocks were not redone
    assert not (tmp_path / "resumed.partial").exists()
    a, b = all_tensors(clean), all_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_stale_partial_state_from_other_settings_is_not_reused(work, tmp_path, monkeypatch):
    out = tmp_path / "q"
    monkeypatch.setenv(pipeline.INTERRUPT_ENV, "0")
    assert quantize(work, out, "--method", "rtn") == 130
    monkeypatch.delenv(pipeline.INTERRUPT_ENV)
    assert quantize(work, out, "--method", "gptq") == 0
    assert report(out)["layers"]["model.layers.0.self_attn.q_proj"]["method"] == "gptq"


def test_a_failed_save_is_one_line_and_the_last_committed_block_stays(work, tmp_path, monkeypatch, capsys):
    # the resume state is written on a thread beside the next block: its error must still stop the run with one
    # line, before any checkpoint, and block 0 (committed) must be what a rerun resumes from
    real = pipeline.save_block

    def save(pdir, fingerprint, i, *rest):
        if i == 1:
            raise OSError(28, "No space left on device")
        real(pdir, fingerprint, i, *rest)

    monkeypatch.setattr(pipeline, "save_block", save)
    out = tmp_path / "q"
    rc = main(["quantize", str(work / "tiny"), "--out", str(out), "--calib", str(work / "calib.txt"), "--nsamples",
               "4", "--seqlen", "64", "--method", "rtn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "could not save the resume state" in err[0] and "No space left on device" in err[0]
    assert not out.exists()
    assert json.loads((tmp_path / "q.partial/state.json").read_text())["next_block"] == 1


def test_block_saver_joins_and_reports(monkeypatch):
    done = []
    saver = pipeline.BlockSaver("nowhere")
    monkeypatch.setattr(pipeline, "save_block", lambda pdir, i: done.append((pdir, i)))
    saver.submit(0)
    saver.submit(1)  # waits for save 0 first
    saver.wait()
    assert done == [("nowhere", 0), ("nowhere", 1)] and saver.thread is None
    monkeypatch.setattr(pipeline, "save_block", lambda pdir, i: 1 / 0)
    saver.submit(2)
    saver.wait(check=False)  # an error of the caller's is on its way: this one is dropped
    saver.submit(3)
    with pytest.raises(QuantEaseError, match="could not save the resume state in nowhere: division by zero"):
        saver.wait()
    saver.wait()  # reported once


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_xtx_is_the_float32_sum(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA: the tensor-core path for half inputs
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(300, 40, generator=gen) * 3).to(dtype)
    b = (torch.randn(300, 40, generator=gen) * 3).to(dtype)
    sigma = torch.randn(40, 40, generator=gen)
    expect = sigma.double() + a.double().t() @ b.double()
    got = sigma.to(device)
    pipeline.add_xtx(got, a.to(device), b.to(device))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), expect, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------- bad input: one line, rc 2, nothing written

def bad(work, tmp_path, capsys, argv, partial=False):
    out = tmp_path / "out"
    rc = main(["quantize", *[a.format(work=work, tmp=tmp_path) for a in argv], "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("quantease quantize: error: "), err
    assert not out.exists()
    assert (tmp_path / "out.partial").exists() == partial
    return err[0]


def test_missing_model_folder(work, tmp_path, capsys):
    msg = bad(work, tmp_path, capsys, ["{tmp}/nope", "--calib", "{work}/calib.txt"])
    assert "model folder" in msg and "not found" in msg


def test_missing_calibration_file(work, tmp_path, capsys):
    msg = bad(work, tmp_path, capsys, ["{work}/tiny", "--calib", "{tmp}/missing.jsonl"])
    assert "calibration file" in msg and "not found" in msg


def test_too_few_calibration_tokens(work, tmp_path, capsys):
    msg = bad(work, tmp_path, capsys, ["{work}/tiny", "--calib", "{work}/calib.txt", "--nsamples", "128",
                                       "--seqlen", "2048"])
    assert "has 20000 tokens, fewer than --nsamples 128 x --seqlen 2048 = 262144" in msg


def test_unsupported_architecture(work, tmp_path, capsys):
    from transformers import T5Config
    T5Config(vocab_size=258, d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16).save_pretrained(tmp_path / "t5")
    msg = bad(work, tmp_path, capsys, ["{tmp}/t5", "--calib", "{work}/calib.txt"])
    assert "unsupported architecture t5" in msg and "Llama" in msg


def test_existing_output_needs_overwrite(work, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["quantize", str(work / "tiny"), "--out", str(out), "--calib", str(work / "calib.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "mine"


def test_outliers_need_quantease(work, tmp_path, capsys):
    msg = bad(work, tmp_path, capsys, ["{work}/tiny", "--calib", "{work}/calib.txt", "--method", "gptq",
                                       "--outliers", "0.01"])
    assert "--outliers needs --method quantease" in msg


def test_lm_head_bits_checked(work, tmp_path, capsys):
    msg = bad(work, tmp_path, capsys, ["{work}/tiny", "--calib", "{work}/calib.txt", "--lm-head", "5"])
    assert "--lm-head: bits=5 is not supported" in msg


def test_no_final_norm_found_is_a_clear_error(work):
    model = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=torch.float32)
    _, blocks = discover.find_blocks(model)
    last = torch.randn(1, 8, 64)
    with pytest.raises(QuantEaseError, match="--lm-head: cannot find what runs between the last block"):
        pipeline.find_head_input(model, blocks, {"last": last, "head": last.flip(-1)})
    with torch.no_grad():
        head = model.model.norm(last)
    assert pipeline.find_head_input(model, blocks, {"last": last, "head": head}) is model.model.norm


def head_inputs(folder, ids):
    """The lm_head's inputs [T, hidden] on `ids` in the dense (dequantized) model of a checkpoint folder."""
    from quantease.eval import load_model

    model = load_model(folder, torch.float32, dense=True, device="cpu")
    caught = []
    h = model.lm_head.register_forward_pre_hook(lambda m, a: caught.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    return torch.cat(caught)


def test_lm_head_quantized_on_the_final_hidden_states(work, tmp_path):
    from pipeline_helpers import tiny_llama_with_tokenizer

    src = tiny_llama_with_tokenizer(tmp_path / "tied", tie_word_embeddings=True)
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    # a final norm that weighs the channels unevenly: the lm_head's Σ must be taken after it to fit its inputs
    fp.model.norm.weight.data = torch.logspace(-1, 1, 64, dtype=torch.float16)[
        torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    fp.save_pretrained(src)
    fp = fp.float()
    for method in ("quantease", "rtn"):
        assert quantize_tiny(work, tmp_path / method, "--method", method, "--bits", "3", "--lm-head", "4",
                             model=src) == 0
    qc = json.loads((tmp_path / "quantease/config.json").read_text())
    assert qc["tie_word_embeddings"] is False and qc["quantization_config"]["modules_to_not_convert"] == []
    assert qc["quantization_config"]["overrides"] == {"lm_head": {"bits": 4, "outlier_fraction": 0.0}}
    row = report(tmp_path / "quantease")["layers"]["lm_head"]
    assert row["bits_per_weight"] == pytest.approx(4 + 24 / 64) and row["outliers"] == 0  # per channel, K = 64
    assert 0 < row["rel_error"] < 0.05
    tensors = all_tensors(tmp_path / "quantease")
    assert torch.equal(tensors["model.embed_tokens.weight"].float(), fp.model.embed_tokens.weight)  # untouched
    # the lm_head's objective on its real inputs (the final norm's outputs): QuantEase's Σ makes it beat RTN
    from transformers import AutoTokenizer
    ids = calib.load(str(work / "calib.txt"), AutoTokenizer.from_pretrained(src), 2, 64, seed=1)
    w = fp.lm_head.weight.detach()
    errs = {}
    for method in ("quantease", "rtn"):
        x = head_inputs(tmp_path / method, ids)
        _, dense = dequantized_tensors(tmp_path / method, dtype=torch.float32)
        errs[method] = float(((w - dense["lm_head.weight"]) @ x.t()).square().sum())
    assert errs["quantease"] < 0.5 * errs["rtn"], errs  # Σ before the norm instead: 1.4x RTN's
    from quantease.eval import evaluate
    dense_ppl = evaluate(tmp_path / "quantease", work / "calib.txt", seqlen=64, limit=3, device="cpu", dense=True)
    runtime_ppl = evaluate(tmp_path / "quantease", work / "calib.txt", seqlen=64, limit=3, device="cpu")
    assert runtime_ppl["ppl"] == pytest.approx(dense_ppl["ppl"], rel=1e-3)


def test_out_of_gpu_memory_names_the_block(work, tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(pipeline, "quantize_block", oom)
    msg = bad(work, tmp_path, capsys, ["{work}/tiny", "--calib", "{work}/calib.txt", "--nsamples", "4",
                                       "--seqlen", "64"], partial=True)  # resume state (calibration ids) kept
    assert "out of GPU memory on block 0 (model.layers.0)" in msg and "--nsamples" in msg


# ---------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_quantease_outliers_real_run(smollm2_dir, c4_path, wikitext_path, tmp_path):
    """Real weights and data, kept to minutes on 2 CPU cores: SmolLM2's first block (the rest cut off),
    8 x 256 calibration tokens from C4, 3-bit QuantEase + 1% outliers, WikiText-2 ppl on 4 windows."""
    from quantease.eval import evaluate

    cut = tmp_path / "smol1"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float16)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(cut)
    for f in smollm2_dir.glob("tokenizer*"):
        (cut / f.name).write_bytes(f.read_bytes())
    common = ["--calib", str(c4_path), "--nsamples", "8", "--seqlen", "256", "--bits", "3"]
    assert main(["quantize", str(cut), "--out", str(tmp_path / "rtn"), "--method", "rtn", *common]) == 0
    assert main(["quantize", str(cut), "--out", str(tmp_path / "qe"), "--method", "quantease", "--outliers", "0.01",
                 "--sweeps", "2", *common]) == 0
    qe, rtn = report(tmp_path / "qe")["layers"], report(tmp_path / "rtn")["layers"]
    assert len(qe) == 7
    for name in qe:
        assert qe[name]["rel_error"] < 0.7 * rtn[name]["rel_error"], name
    # a 1-block model's perplexity means little: compare what the cut model computes instead
    res = evaluate(tmp_path / "qe", wikitext_path, seqlen=256, limit=4, device="cpu", dense=True)
    assert res["windows"] == 4 and math.isfinite(res["ppl"])
    from quantease.eval import eval_windows, load, read_rows_text
    dev = torch.device("cpu")
    fp, tok = load(cut, dev)
    windows = eval_windows(tok, read_rows_text(wikitext_path), 256, limit=4)
    with torch.no_grad():
        ref = fp.model(windows).last_hidden_state
        err = {}
        for name in ("qe", "rtn"):
            q, _ = load(tmp_path / name, dev, dense=True)
            err[name] = float((q.model(windows).last_hidden_state - ref).pow(2).sum() / ref.pow(2).sum())
    assert err["qe"] < 0.5 * err["rtn"], err


def test_hub_id_without_a_reachable_hub(work, tmp_path, capsys):
    msg = bad(work, tmp_path, capsys, ["no-such-org-quantease/no-such-model", "--calib", "{work}/calib.txt"])
    assert "no-such-org-quantease/no-such-model" in msg


@pytest.mark.cuda
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_run_matches_cpu_run(work, tmp_path, monkeypatch, offload):
    """On the GPU (fp16 blocks, one at a time; activations on the GPU or offloaded to the CPU) the checkpoint
    computes nearly what the CPU (fp32) run's does."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from quantease.eval import evaluate
    if offload:
        monkeypatch.setattr(pipeline, "keep_on_device", lambda n, device: False)
    args = ("--method", "quantease", "--outliers", "0.05", "--sweeps", "3")
    assert quantize(work, tmp_path / "gpu", *args, "--device", "cuda") == 0
    assert quantize(work, tmp_path / "cpu", *args, "--device", "cpu") == 0
    ppl = {d: evaluate(tmp_path / d, work / "calib.txt", seqlen=64, limit=3, device="cpu", dense=True)["ppl"]
           for d in ("gpu", "cpu")}
    assert ppl["gpu"] == pytest.approx(ppl["cpu"], rel=0.02)
    rel = {d: report(tmp_path / d)["layers"]["model.layers.1.mlp.down_proj"]["rel_error"] for d in ("gpu", "cpu")}
    assert rel["gpu"] == pytest.approx(rel["cpu"], rel=0.2)


@pytest.mark.parametrize("source", ["jsonl", "self"])
def test_quantize_from_jsonl_and_self_calibration(work, tmp_path, source):
    from pipeline_helpers import write_jsonl
    spec = "self" if source == "self" else str(write_jsonl(tmp_path / "c.jsonl", [corpus(3000, seed=s) for s in range(3)]))
    out = tmp_path / "q"
    assert main(["quantize", str(work / "tiny"), "--out", str(out), "--calib", spec, "--nsamples", "3",
                 "--seqlen", "48", "--method", "gptq"]) == 0
    cal = report(out)["calibration"]
    assert cal == {"source": spec, "nsamples": 3, "seqlen": 48, "seed": 0}
