"""How QuantEase's outlier slots fall into 256-column blocks on real layers (sizing an outlier add inside the K loop).

    .venv/bin/python benchmarks/outlier_blocks.py                 # SmolLM2-135M blocks 2 and 10 (CPU, ~1 min)
    .venv/bin/python benchmarks/outlier_blocks.py --caps 4,2,1    # + the error with <= cap slots per (row, block)

For each layer and outlier fraction: the slots per (row, 256-column block) -- mean, max, the share of cells over 2
and over 4 -- against a Poisson count of the same mean (outlier columns drawn at random), and how many rows the most
used columns serve (column clustering).  Sigma and the model as benchmarks/layer_quality.py (its --cache file).
--caps: the same quantization with the IHT's support limited to <= cap slots per (row, block) (capped_top in place
of outliers.top_support: what an outlier table by K-block would require), its relative error f / tr(W Sigma W^T)
against the uncapped one's.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import layer_quality  # noqa: E402
from quantease.quantize import outliers, quantize_weight  # noqa: E402

BLOCK = 256  # the half2 words' block: what one K-loop iteration of gemm_half2 reads


def block_counts(idx, val, k):
    """[rows, blocks] slots in use per (row, 256-column block); padding slots (value 0) do not count."""
    blocks = math.ceil(k / BLOCK)
    cnt = torch.zeros(idx.shape[0], blocks)
    cnt.scatter_add_(1, idx.long() // BLOCK, (val != 0).float())
    return cnt


def poisson_tail(lam, above):
    """P(X > above) for X ~ Poisson(lam)."""
    return 1 - sum(math.exp(-lam) * lam ** j / math.factorial(j) for j in range(above + 1))


def capped_top(score, r, cap):
    """Per row the R largest scores with at most `cap` of them in any 256-column block (greedy in score order:
    exact, the caps make a partition matroid -- a block can only ever contribute its best `cap` candidates)."""
    n, k = score.shape
    if sum(min(cap, k - b0) for b0 in range(0, k, BLOCK)) < r:  # a short last block holds fewer
        raise ValueError(f"a cap of {cap} per block leaves fewer than R = {r} slots in {k} columns")
    order = torch.argsort(score, dim=1, descending=True)
    blk, pos = torch.sort(order // BLOCK, dim=1, stable=True)  # by block, score order within a block
    rank_sorted = torch.arange(k)[None, :] - torch.searchsorted(blk, blk)  # rank inside its block
    rank = torch.empty_like(rank_sorted).scatter_(1, pos, rank_sorted)  # back to score order
    keep = rank < cap
    take = keep & (keep.cumsum(1) <= r)
    return order[take].view(n, r)


def quantize_capped(w, s, fraction, cap):
    """quantize_weight's result with the IHT support capped per (row, block) (cap 0: as shipped)."""
    plain = outliers.top_support
    if cap:
        outliers.top_support = lambda score, r, structured: capped_top(score, r, cap)
    try:
        r = quantize_weight(w, s, bits=3, outlier_fraction=fraction)
    finally:
        outliers.top_support = plain
    if cap:
        assert int(block_counts(r.outlier_idx, r.outlier_val, w.shape[1]).max()) <= cap
    return r


def row(name, w, r, fraction):
    """The counts table's row for layer w quantized (uncapped) as r."""
    cnt = block_counts(r.outlier_idx, r.outlier_val, w.shape[1])
    lam = cnt.mean().item()
    used = r.outlier_val != 0
    cols = torch.bincount(r.outlier_idx.long()[used], minlength=w.shape[1])
    top = ", ".join(str(int(c)) for c in cols.topk(4).values)
    return (f"| {name} | {w.shape[0]}x{w.shape[1]} | {fraction * 100:g}% | {r.outlier_idx.shape[1]} | {lam:.2f} | "
            f"{int(cnt.max())} | {(cnt > 2).float().mean() * 100:.1f} ({poisson_tail(lam, 2) * 100:.1f}) | "
            f"{(cnt > 4).float().mean() * 100:.2f} ({poisson_tail(lam, 4) * 100:.2f}) | {top} of {w.shape[0]} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.005, 0.01])
    ap.add_argument("--layers", nargs="+", default=["q_proj", "gate_proj", "down_proj"], help="name endings")
    ap.add_argument("--cache", default="/tmp/smollm_sigmas.pt")
    ap.add_argument("--caps", default="", help="also the error with <= cap slots per (row, block), e.g. 4,2,1")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = layer_quality.smollm_layers(args.blocks, 32, 512, cache=args.cache or None)
    chosen = [(name, w, sig) for name, (w, sig) in layers.items() if name.endswith(tuple(args.layers))]
    caps = [int(c) for c in args.caps.split(",") if c]
    print("| layer | N x K | outliers | R | slots / (row, block) | max | cells > 2, % (Poisson) | cells > 4, % "
          "(Poisson) | rows of the 4 most used columns |")
    print("|---|---|---|---|---|---|---|---|---|")
    capped_rows = []
    for fraction in args.fractions:
        for name, w, sig in chosen:
            r = quantize_capped(w, sig, fraction, 0)
            print(row(name, w, r, fraction), flush=True)
            base = r.info["rel_error"]
            cells = []
            for c in caps:
                try:
                    e = quantize_capped(w, sig, fraction, c).info["rel_error"]
                    cells.append(f"{e:.5f} ({e / base:.3f})")
                except ValueError:  # too few slots under this cap
                    cells.append("-")
            capped_rows.append(f"| {name} | {fraction * 100:g}% | {r.outlier_idx.shape[1]} | {base:.5f} | "
                               + " | ".join(cells) + " |")
    if caps:
        print("\n| layer | outliers | R | rel. error, no cap | "
              + " | ".join(f"cap {c}: rel. error (x no cap)" for c in caps) + " |")
        print("|---|---|---|---|" + "---|" * len(caps))
        print("\n".join(capped_rows))

if __name__ == "__main__":
    main()
