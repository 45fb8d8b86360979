"""Calibration data: windows from .txt/.jsonl, data-free `self`, and the clear errors."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline_helpers import BOS, corpus, tiny_llama_with_tokenizer, write_jsonl
from quantease.errors import QuantEaseError
from quantease.quantize import calib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_with_tokenizer(tmp_path_factory.mktemp("calib") / "tiny")


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny)


def test_txt_windows_are_seeded_slices_of_the_text(tmp_path, tok):
    text = corpus(5000)
    path = tmp_path / "c.txt"
    path.write_text(text)
    ids = calib.load(path, tok, nsamples=6, seqlen=50, seed=1)
    assert ids.shape == (6, 50) and ids.dtype == torch.int64
    full = calib.tokenize(tok, text)
    assert full.numel() == 5000  # byte tokenizer: one token per character
    for row in ids:
        starts = [s for s in range(full.numel() - 49) if torch.equal(full[s:s + 50], row)]
        assert starts, "every window is a contiguous slice of the tokenized text"
    assert torch.equal(ids, calib.load(path, tok, nsamples=6, seqlen=50, seed=1))
    assert not torch.equal(ids, calib.load(path, tok, nsamples=6, seqlen=50, seed=2))


def test_jsonl_joins_text_fields(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", ["first doc", "second doc"])
    assert calib.read_text(path) == "first doc\n\nsecond doc"
    ids = calib.load(path, tok, nsamples=2, seqlen=10, seed=0)
    assert ids.shape == (2, 10)
    text = tok.decode(ids[0])
    assert text in "first doc\n\nsecond doc"


def test_jsonl_without_text_field_names_the_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(QuantEaseError, match=r"bad.jsonl:2: no \"text\""):
        calib.load(path, tok, 1, 2)


def test_too_short_text_gives_the_real_token_count(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("x" * 300)
    with pytest.raises(QuantEaseError, match=r"has 300 tokens, fewer than --nsamples 4 x --seqlen 100 = 400"):
        calib.load(path, tok, nsamples=4, seqlen=100)


def test_missing_file(tmp_path, tok):
    with pytest.raises(QuantEaseError, match="not found"):
        calib.load(tmp_path / "nope.jsonl", tok, 1, 8)


def test_unknown_dataset_name_without_datasets_package(tok, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails like an uninstalled package
    with pytest.raises(QuantEaseError, match="no such file, and dataset names need the `datasets` package"):
        calib.load("some-dataset", tok, 1, 8)


def test_self_generates_fixed_length_seeded_sequences_from_bos(tiny, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    a = calib.load("self", tok, nsamples=3, seqlen=12, seed=5, model=model)
    b = calib.load("self", tok, nsamples=3, seqlen=12, seed=5, model=model)
    c = calib.load("self", tok, nsamples=3, seqlen=12, seed=6, model=model)
    assert a.shape == (3, 12)
    assert (a[:, 0] == BOS).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a[:, 1:].flatten().tolist())) > 5  # sampled, not one repeated token
