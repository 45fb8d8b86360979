"""Helpers for the pipeline/eval/calib tests: a byte-level tokenizer and tiny random models of several families."""
import json
from pathlib import Path

import torch

from conftest import make_tiny_llama

VOCAB = 258  # 256 byte tokens + <s> + </s>
BOS, EOS = 256, 257


def add_byte_tokenizer(path):
    """Save a byte-level tokenizer (every byte one token; <s>=256, </s>=257) into path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": BOS, "</s>": EOS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def tiny_llama_with_tokenizer(path, **overrides):
    make_tiny_llama(path, vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, **overrides)
    add_byte_tokenizer(path)
    return Path(path)


def family_config(family):
    """(config, expected block-stack name, expected linear groups of block 0) of a tiny random model."""
    from transformers import Gemma3TextConfig, GPT2Config, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    llama_groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    if family == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
        return cfg, "model.layers", llama_groups
    if family == "mistral":
        cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, sliding_window=16, **common)
        return cfg, "model.layers", llama_groups
    if family == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"], **common)
        return cfg, "model.layers", llama_groups
    if family == "opt":
        cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=64, max_position_embeddings=256, pad_token_id=EOS, **common)
        return cfg, "model.decoder.layers", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                             ["self_attn.out_proj"], ["fc1"], ["fc2"]]
    if family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        return cfg, "transformer.h", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]
    raise ValueError(family)


def make_family(path, family, seed=0):
    from transformers import AutoModelForCausalLM

    cfg, _, _ = family_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float16)
    model.save_pretrained(path)
    add_byte_tokenizer(path)
    return Path(path)


def write_jsonl(path, texts):
    Path(path).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return Path(path)


def corpus(n_chars=20000, seed=0):
    """Deterministic pseudo-English text (a byte tokenizer makes one token per character)."""
    g = torch.Generator().manual_seed(seed)
    words = ["the", "model", "quantized", "weights", "of", "a", "layer", "and", "bits", "grid", "outlier",
             "sweep", "data", "token", "is", "in", "to", "calibration", "error", "block"]
    out, size = [], 0
    while size < n_chars:
        idx = torch.randint(0, len(words), (12,), generator=g).tolist()
        s = " ".join(words[i] for i in idx) + ".\n"
        out.append(s)
        size += len(s)
    return "".join(out)[:n_chars]


def make_work(d):
    """A folder with calib.txt and a tiny Llama with a byte tokenizer ("tiny"): the CLI tests' inputs."""
    (d / "calib.txt").write_text(corpus(20000))
    tiny_llama_with_tokenizer(d / "tiny")
    return d


def quantize_tiny(work, out, *extra, model=None):
    """`quantease quantize` of work/tiny (or `model`) with 4 x 64 tokens of work/calib.txt; returns the exit code."""
    from quantease.cli import main

    return main(["quantize", str(model or work / "tiny"), "--out", str(out), "--calib", str(work / "calib.txt"),
                 "--nsamples", "4", "--seqlen", "64", *extra])


def all_tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def report(folder):
    return json.loads((Path(folder) / "quantease_report.json").read_text())
