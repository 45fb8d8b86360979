"""What a quantized lm_head would cost in perplexity -- the one batch-1 lever of issue 7 outside the GEMVs
(benchmarks/results/throughput.md, run 7: the fp16 lm_head is 0.37 ms of a 3.35 ms decode step).

The model's body is left as it is (its stored weights, run in float32 on CPU); only the output projection is replaced,
untied from the embeddings when they are shared, by each method's dequantized weight.  Its Σ = XXᵀ comes from the
final norm's outputs on calibration text.  The result is a design number for whether to build an lm_head option.
Nothing in the product quantizes the lm_head today.

    .venv/bin/python benchmarks/lm_head_quality.py --model .cache/smollm2-135m-instruct \\
        --calib ../shared/data/c4/c4_sample.jsonl --data ../shared/data/wikitext2/wiki.test.raw
"""
import argparse
import time

import torch

from quantease.eval import eval_windows, load, perplexity, read_rows_text
from quantease.quantize import calib, layer_error, quantize_weight

# (label, method, bits, outlier fraction)
CONFIGS = (("rtn 3-bit", "rtn", 3, 0.0), ("gptq 3-bit", "gptq", 3, 0.0), ("quantease 3-bit", "quantease", 3, 0.0),
           ("quantease 3-bit + 0.5%", "quantease", 3, 0.005), ("gptq 4-bit", "gptq", 4, 0.0),
           ("quantease 4-bit", "quantease", 4, 0.0))


def head_sigma(model, ids):
    """Σ of the lm_head's inputs (float64 sums) over the calibration windows."""
    head = model.get_output_embeddings()
    sigma = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)

    def add(_, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        sigma.add_(x.t() @ x)

    hook = head.register_forward_pre_hook(add)
    try:
        with torch.no_grad():
            for row in ids:
                model(row[None], use_cache=False)
    finally:
        hook.remove()
    return sigma.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calibration text (a --calib value of `quantease quantize`)")
    ap.add_argument("--data", required=True, help="evaluation text (WikiText-2 raw test)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16, help="2048-token evaluation windows")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load(args.model, torch.device("cpu"))
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    w = head.weight.detach().float().clone()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untied from here on
    t0 = time.time()
    sigma = head_sigma(model, calib.load(args.calib, tok, args.nsamples, args.seqlen))
    windows = eval_windows(tok, read_rows_text(args.data), 2048, args.windows)
    print(f"lm_head {tuple(w.shape)} (tied to the embeddings: {tied}); Σ from {args.nsamples} x {args.seqlen} "
          f"tokens in {time.time() - t0:.0f} s; {windows.shape[0]} windows of 2048", flush=True)
    with torch.no_grad():
        rows = [("unquantized", perplexity(model, windows, "cpu", progress=False), 0.0, 0.0)]
        print(f"| unquantized | {rows[0][1]:.2f} | | |", flush=True)
        for label, method, bits, frac in CONFIGS:
            t1 = time.time()
            qw = quantize_weight(w, sigma, bits=bits, method=method, outlier_fraction=frac)
            deq = qw.dequantize().float()
            rel = layer_error(w, deq, sigma)[1]
            head.weight.copy_(deq.to(head.weight.dtype))
            rows.append((label, perplexity(model, windows, "cpu", progress=False), rel, time.time() - t1))
            print(f"| {label} | {rows[-1][1]:.2f} | {rel:.4f} | {rows[-1][3]:.0f} |", flush=True)
    print("\n| lm_head | WikiText-2 ppl | layer rel. error | s |\n|---|---|---|---|")
    for label, ppl, rel, s in rows:
        print(f"| {label} | {ppl:.2f} | {rel:.4f} | {s:.0f} |")


if __name__ == "__main__":
    main()
