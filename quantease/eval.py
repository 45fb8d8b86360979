"""`quantease eval DIR --data PATH`: perplexity of an fp16 or a quantease-quantized HF folder.

GPTQ convention: the rows of the WikiText-2 raw test file joined with "\\n\\n", tokenized once,
cut into non-overlapping windows of seqlen tokens (the tail shorter than seqlen is dropped), and
ppl = exp(mean over windows of the mean token nll).  --limit N evaluates the first N windows only.
A folder whose config.json has quantization_config.quant_method == "quantease" loads through
quantease.runtime; anything else through transformers.
"""
import json
import math
import time
from pathlib import Path

import torch

from quantease.errors import QuantEaseError


def add_arguments(p):
    p.add_argument("model", help="HF model folder: fp16 or a quantease checkpoint")
    p.add_argument("--data", required=True, help="text file, e.g. wikitext-2-raw wiki.test.raw (or .jsonl with \"text\")")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N windows")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dense", action="store_true",
                   help="quantized folders: dequantize to a plain model instead of quantease.runtime")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks (needs the lm-eval package and its data)")


def run(args):
    if args.tasks:
        check_lm_eval(args.tasks)
    result = evaluate(args.model, args.data, seqlen=args.seqlen, limit=args.limit, device=args.device,
                      dense=args.dense)
    print(f"{result['model']}: ppl {result['ppl']:.4f} ({result['windows']} windows x {result['seqlen']} tokens, "
          f"{result['seconds']:.1f} s)")
    return 0


def check_lm_eval(tasks):
    """lm-eval tasks need the package and its datasets from the Hub; say plainly when they are missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise QuantEaseError(f"--tasks {tasks}: the lm-eval package is not installed (pip install lm-eval); "
                             f"its task data also needs a reachable Hugging Face Hub") from None
    raise QuantEaseError(f"--tasks {tasks}: lm-eval tasks are not wired up in this version; "
                         f"use lm_eval --model hf --model_args pretrained=DIR after `import quantease.runtime`")


# ---------------------------------------------------------------- data

def read_rows_text(path):
    """Rows joined with "\\n\\n": the raw file's lines as the HF wikitext rows, or .jsonl "text" fields."""
    path = Path(path)
    if not path.is_file():
        raise QuantEaseError(f"evaluation data {path} not found")
    if path.suffix == ".jsonl":
        from quantease.quantize.calib import read_text
        return read_text(path)
    # the HF wikitext rows: each line with its newline, whitespace-only lines as ""
    with open(path, encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    return "\n\n".join(rows)


def eval_windows(tokenizer, text, seqlen, limit=None):
    """int64 [n, seqlen] non-overlapping windows of the tokenized text."""
    from quantease.quantize.calib import tokenize

    ids = tokenize(tokenizer, text)
    n = ids.numel() // seqlen
    if n == 0:
        raise QuantEaseError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    if limit is not None:
        if limit < 1:
            raise QuantEaseError(f"--limit {limit}: must be >= 1")
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


# ---------------------------------------------------------------- model

def is_quantized(model_dir):
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "quantease"


def load_dequantized(path, dtype):
    """A quantease checkpoint as a plain dense model: every packed linear dequantized (format.layout
    semantics) into an ordinary weight.  Same function as the runtime's quantized linears, no kernels."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantease.format.checkpoint import dequantized_tensors, validate_checkpoint
    from quantease.quantize.discover import is_conv1d

    config_dict, tensors = dequantized_tensors(path, dtype=dtype)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # GPT-2's Conv1D stores [in, out]; the checkpoint holds every quantized weight as [out, in]
    modules = dict(model.named_modules())
    quantized = validate_checkpoint(path, content=False)[2]
    flip = {f"{p}.weight" for p in quantized if is_conv1d(modules.get(p))}
    tensors = {k: (v.t() if k in flip else v).to(dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise QuantEaseError(f"{path}: checkpoint does not match its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    model.tie_weights()
    return model


def load(model_dir, device, dense=False):
    """(model, tokenizer) on device, fp32 on CPU, fp16 on CUDA.  dense: a quantized folder is
    dequantized into a plain model instead of loading through quantease.runtime."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise QuantEaseError(f"model folder {path} not found (or it has no config.json)")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise QuantEaseError(f"model folder {path}: no usable tokenizer ({type(e).__name__})") from None
    from quantease.quantize.pipeline import quiet_loading

    with quiet_loading():
        model = load_model(path, dtype, dense, device)
    model.to(device).eval()
    return model, tokenizer


def load_model(path, dtype, dense, device):
    from transformers import AutoModelForCausalLM

    if is_quantized(path) and dense:
        model = load_dequantized(path, dtype)
    elif is_quantized(path):
        import quantease.runtime as runtime
        model = runtime.load(path, device=device, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model


def pick_device(device):
    from quantease.quantize.pipeline import pick_device as pick
    return pick(device)


# ---------------------------------------------------------------- perplexity

@torch.no_grad()
def perplexity(model, windows, device=None, progress=None):
    """exp(mean over windows of the mean next-token nll) for int64 windows [n, seqlen]."""
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    nlls = []
    for row in tqdm(windows, desc="ppl", disable=None if progress is None else not progress):
        ids = row[None].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean")
        nlls.append(float(nll))
    return math.exp(sum(nlls) / len(nlls))


def evaluate(model_dir, data, seqlen=2048, limit=None, device=None, dense=False):
    """{"model", "ppl", "windows", "seqlen", "seconds", "quantized"} of one folder on one text file."""
    if seqlen < 2:
        raise QuantEaseError(f"--seqlen {seqlen}: must be >= 2")
    dev = pick_device(device)
    text = read_rows_text(data)
    model, tokenizer = load(model_dir, dev, dense)
    windows = eval_windows(tokenizer, text, seqlen, limit)
    t0 = time.time()
    ppl = perplexity(model, windows, dev)
    return dict(model=str(model_dir), ppl=ppl, windows=windows.shape[0], seqlen=seqlen,
                seconds=time.time() - t0, quantized=is_quantized(model_dir))
