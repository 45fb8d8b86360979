"""Calibration data: nsamples windows of seqlen token ids, int64 [nsamples, seqlen].

Sources
    a .txt file                the whole text, tokenized once
    a .jsonl file              the "text" field of every row, joined with blank lines, tokenized once
    self                       data-free: sequences the model samples itself, starting from BOS
    a dataset name             through the `datasets` package when it and the Hub are reachable
From a text, windows start at seeded random offsets (GPTQ convention; windows may overlap), and a
text shorter than nsamples * seqlen tokens is an error that names the real count.
"""
import json
from pathlib import Path

import torch

from quantease.errors import QuantEaseError

SELF = "self"


def read_text(path):
    """Text of a .txt file, or the "text" fields of a .jsonl file joined with blank lines."""
    path = Path(path)
    if not path.is_file():
        raise QuantEaseError(f"calibration file {path} not found")
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8", errors="replace")
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantEaseError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise QuantEaseError(f"{path}:{lineno}: no \"text\" string field")
            texts.append(row["text"])
    return "\n\n".join(texts)


def tokenize(tokenizer, text):
    """int64 [T] token ids of one long text (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def windows(ids, nsamples, seqlen, seed, source="the calibration text"):
    """nsamples random windows of seqlen tokens from ids [T]."""
    need = nsamples * seqlen
    if ids.numel() < need:
        raise QuantEaseError(
            f"{source} has {ids.numel()} tokens, fewer than --nsamples {nsamples} x --seqlen {seqlen} "
            f"= {need}; lower --nsamples or --seqlen, or give more text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def from_text(text, tokenizer, nsamples, seqlen, seed, source="the calibration text"):
    return windows(tokenize(tokenizer, text), nsamples, seqlen, seed, source)


# self-calibration samples this many tokens per generate() call: 8 sequences at seqlen 2048 (an 8B Llama's KV
# cache ~2 GiB), more of shorter ones (generate's cost is per step: 32 x 256 took 89 s in batches of 8, 42 s in one
# batch of 32 on the 2-core CPU)
SELF_BATCH_TOKENS = 16384


def from_model(model, tokenizer, nsamples, seqlen, seed, temperature=1.0, batch_size=None):
    """Data-free calibration: nsamples sequences of exactly seqlen tokens sampled by the model itself
    (batch_size sequences per generate call; default as many as fit SELF_BATCH_TOKENS, at least 1)."""
    batch_size = batch_size or max(1, SELF_BATCH_TOKENS // seqlen)
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    if bos is None:
        raise QuantEaseError("--calib self needs a tokenizer with a BOS or EOS token to start from")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    for start in range(0, nsamples, batch_size):
        n = min(batch_size, nsamples - start)
        prompt = torch.full((n, 1), bos, dtype=torch.int64, device=device)
        with torch.no_grad():
            seqs = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                  temperature=temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                                  pad_token_id=tokenizer.eos_token_id or bos)
        out.append(seqs[:, :seqlen].cpu())
    return torch.cat(out)


def from_dataset(name, tokenizer, nsamples, seqlen, seed):
    try:
        import datasets
    except ImportError:
        raise QuantEaseError(f"--calib {name}: no such file, and dataset names need the `datasets` package "
                             f"(pip install datasets) and a reachable Hugging Face Hub") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # hub unreachable, unknown name, ...: one line either way
        raise QuantEaseError(f"--calib {name}: no such file, and the dataset could not be loaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if "text" not in ds.column_names:
        raise QuantEaseError(f"--calib {name}: the dataset has no \"text\" column")
    return from_text("\n\n".join(ds["text"]), tokenizer, nsamples, seqlen, seed, f"dataset {name}")


def load(spec, tokenizer, nsamples, seqlen, seed=0, model=None):
    """Calibration token ids int64 [nsamples, seqlen] from a --calib value."""
    if nsamples < 1 or seqlen < 2:
        raise QuantEaseError(f"--nsamples must be >= 1 and --seqlen >= 2 (got {nsamples}, {seqlen})")
    spec = str(spec)
    if spec == SELF:
        if model is None:
            raise QuantEaseError("--calib self needs the model")
        return from_model(model, tokenizer, nsamples, seqlen, seed)
    path = Path(spec)
    if path.exists() or path.suffix in (".txt", ".jsonl", ".raw") or spec.startswith((".", "/", "~")):
        return from_text(read_text(path), tokenizer, nsamples, seqlen, seed, str(path))
    return from_dataset(spec, tokenizer, nsamples, seqlen, seed)
