"""`quantease eval`: GPTQ-convention perplexity on fp16 and quantized folders, and its errors."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline_helpers import corpus, tiny_llama_with_tokenizer
from quantease import eval as qeval
from quantease.cli import main


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    tiny_llama_with_tokenizer(d / "tiny")
    (d / "data.txt").write_text(corpus(3000, seed=3))
    return d


def test_rows_are_joined_with_blank_lines(tmp_path):
    path = tmp_path / "wiki.raw"
    path.write_text(" \n = Title = \n \n Body text .\n")
    # HF wikitext rows: "", " = Title = \n", "", " Body text .\n"
    assert qeval.read_rows_text(path) == "\n\n = Title = \n\n\n\n\n Body text .\n"


def test_windows_are_non_overlapping_and_limited(work):
    tok = AutoTokenizer.from_pretrained(work / "tiny")
    text = "abcdefghij" * 10  # 100 byte tokens
    w = qeval.eval_windows(tok, text, seqlen=30)
    assert w.shape == (3, 30)  # the 10-token tail is dropped
    assert torch.equal(w.flatten(), torch.tensor(tok(text)["input_ids"][:90]))
    assert qeval.eval_windows(tok, text, seqlen=30, limit=2).shape == (2, 30)


def test_perplexity_is_exp_of_mean_window_nll(work):
    model = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=torch.float32)
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]  # HF's own shifted loss
    assert qeval.perplexity(model, windows) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_cli_fp16_folder(work, capsys):
    rc = main(["eval", str(work / "tiny"), "--data", str(work / "data.txt"), "--seqlen", "100", "--limit", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "4 windows x 100 tokens" in out


def test_quantized_folder_is_detected(work, tmp_path):
    assert not qeval.is_quantized(work / "tiny")
    q = tmp_path / "q"
    assert main(["quantize", str(work / "tiny"), "--out", str(q), "--calib", str(work / "data.txt"),
                 "--nsamples", "2", "--seqlen", "64", "--method", "rtn", "--bits", "8"]) == 0
    assert qeval.is_quantized(q)
    fp = qeval.evaluate(work / "tiny", work / "data.txt", seqlen=100, limit=4, device="cpu")
    dq = qeval.evaluate(q, work / "data.txt", seqlen=100, limit=4, device="cpu", dense=True)
    assert dq["quantized"] and not fp["quantized"]
    assert dq["ppl"] == pytest.approx(fp["ppl"], rel=0.01)  # 8-bit: nearly the fp16 model


@pytest.mark.parametrize("argv, needle", [
    (["{work}/missing", "--data", "{work}/data.txt"], "not found"),
    (["{work}/tiny", "--data", "{work}/missing.raw"], "evaluation data"),
    (["{work}/tiny", "--data", "{work}/data.txt", "--seqlen", "5000"], "fewer than one window of --seqlen 5000"),
    (["{work}/tiny", "--data", "{work}/data.txt", "--tasks", "hellaswag"], "lm-eval"),
])
def test_bad_input_is_one_line(work, capsys, argv, needle):
    rc = main(["eval", *[a.format(work=work) for a in argv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("quantease eval: error: "), err
    assert needle in err[0]
