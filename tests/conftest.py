"""Shared fixtures: the real SmolLM2 model and data from ../shared (via QUANTEASE_SHARED), and tiny random models."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTEASE_SHARED", ROOT.parent / "shared"))
CACHE = Path(os.environ.get("QUANTEASE_CACHE", ROOT / ".cache"))


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} not found (set QUANTEASE_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir():
    return _need(SHARED)


@pytest.fixture(scope="session")
def wikitext_path(shared_dir):
    return _need(shared_dir / "data/wikitext2/wiki.test.raw")


@pytest.fixture(scope="session")
def c4_path(shared_dir):
    return _need(shared_dir / "data/c4/c4_sample.jsonl")


@pytest.fixture(scope="session")
def smollm2_dir(shared_dir):
    """SmolLM2-135M-Instruct as an fp16 HF folder, made once into .cache/ by the shared script."""
    out = CACHE / "smollm2-135m-instruct"
    script = _need(shared_dir / "models/smollm2-135m-instruct.sh")
    subprocess.run(["bash", str(script), str(out), sys.executable], check=True, capture_output=True)
    return out


def make_tiny_llama(path, seed=0, **overrides):
    """A tiny random Llama saved as an HF folder (with a small byte-level tokenizer when one can be built)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False, torch_dtype="float16")
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float16)
    model.save_pretrained(path)
    return Path(path)


@pytest.fixture
def tiny_llama(tmp_path):
    return make_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture
def keep_planes(monkeypatch):
    """For tests that call the plane kernels (or build the words from the planes) directly: on CUDA
    prepare_weights drops the planes where the Q = 8 half2 words cover every path (prepare.drop_planes)."""
    monkeypatch.setenv("QUANTEASE_PLANES", "keep")
