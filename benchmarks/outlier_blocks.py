"""How QuantEase's outlier slots fall into 256-column blocks on real layers (sizing an outlier add inside the K loop).

    .venv/bin/python benchmarks/outlier_blocks.py                 # SmolLM2-135M blocks 2 and 10 (CPU, ~1 min)

For each layer and outlier fraction: the slots per (row, 256-column block) -- mean, max, the share of cells over 2
and over 4 -- against a Poisson count of the same mean (outlier columns drawn at random), and how many rows the most
used columns serve (column clustering).  Sigma and the model as benchmarks/layer_quality.py (its --cache file).
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import layer_quality  # noqa: E402
from quantease.quantize import quantize_weight  # noqa: E402

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


def row(name, w, s, fraction):
    r = quantize_weight(w, s, bits=3, outlier_fraction=fraction)
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
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = layer_quality.smollm_layers(args.blocks, 32, 512, cache=args.cache or None)
    print("| layer | N x K | outliers | R | slots / (row, block) | max | cells > 2, % (Poisson) | cells > 4, % "
          "(Poisson) | rows of the 4 most used columns |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fraction in args.fractions:
        for name, (w, s) in layers.items():
            if name.endswith(tuple(args.layers)):
                print(row(name, w, s, fraction), flush=True)


if __name__ == "__main__":
    main()
