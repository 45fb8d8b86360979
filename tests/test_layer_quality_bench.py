"""benchmarks/layer_quality.py's outlier-budget split: feasible, and optimal where every row's curve is convex;
benchmarks/outlier_blocks.py's per-block counts."""
import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import layer_quality  # noqa: E402
import outlier_blocks  # noqa: E402


def convex_rows(n, r, gen):
    """f[i, c]: decreasing, convex in c (gains shrink), like a row's error against its outlier count."""
    gains = torch.rand(n, r, generator=gen, dtype=torch.float64).sort(1, descending=True).values
    start = 5 + torch.rand(n, 1, generator=gen, dtype=torch.float64)
    return torch.cat([start, start - gains.cumsum(1)], 1)


def brute_force(f, budget):
    n, width = f.shape
    best = min((sum(float(f[i, c]) for i, c in enumerate(cs)), cs)
               for cs in itertools.product(range(width), repeat=n) if sum(cs) <= budget)
    return best[0]


def test_split_is_optimal_on_convex_rows():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        f = convex_rows(4, 4, gen)
        budget = trial % 13
        counts, total = layer_quality.best_allocation(f, budget)
        assert int(counts.sum()) <= budget and int(counts.max()) <= 4
        assert abs(total - float(f[torch.arange(4), counts].sum())) < 1e-9
        assert abs(total - brute_force(f, budget)) < 1e-9


def test_split_respects_budget_on_any_rows():
    gen = torch.Generator().manual_seed(1)
    f = torch.rand(50, 7, generator=gen, dtype=torch.float64)  # not monotone, not convex
    counts, total = layer_quality.best_allocation(f, 60)
    assert int(counts.sum()) <= 60 and counts.min() >= 0 and counts.max() <= 6
    assert abs(total - float(f[torch.arange(50), counts].sum())) < 1e-9


def test_outlier_block_counts():
    """Slots per (row, 256-column block), padding (value 0, repeating an index) not counted; a partial last block."""
    idx = torch.tensor([[0, 255, 256, 600, 600], [10, 10, 10, 10, 10]], dtype=torch.int16)
    val = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 6.0, 0.0, 0.0, 0.0]], dtype=torch.float16)
    cnt = outlier_blocks.block_counts(idx, val, 700)
    assert cnt.tolist() == [[2, 1, 1], [2, 0, 0]]
    assert abs(outlier_blocks.poisson_tail(1.0, 0) - (1 - 2.718281828 ** -1)) < 1e-6


def test_capped_top_support():
    """At most `cap` per 256-column block, else the largest scores; a loose cap is plain top-k."""
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(6, 700, generator=gen)
    score[:, 10:20] += 5  # ten favourites in block 0
    idx = outlier_blocks.capped_top(score, 5, 2)
    assert idx.shape == (6, 5)
    assert ((idx // 256)[:, :, None] == torch.arange(3)).sum(1).max() <= 2
    assert set(idx[0].tolist()) & set(range(10, 20)) == set(torch.topk(score[0, 10:20], 2).indices.add(10).tolist())
    for row in range(6):  # the other three are the best outside block 0
        rest = score[row].clone()
        rest[:256] = -1
        assert set(idx[row].tolist()) - set(range(256)) == set(torch.topk(rest, 3).indices.tolist())
    loose = outlier_blocks.capped_top(score, 5, 5)
    assert torch.equal(loose.sort(1).values, torch.topk(score, 5, dim=1).indices.sort(1).values)
    with pytest.raises(ValueError, match="fewer than R"):  # 3 blocks x cap 1 < R = 5
        outlier_blocks.capped_top(score, 5, 1)


def test_lm_head_sigma_is_its_inputs_gram():
    """benchmarks/lm_head_quality.py: Σ of the lm_head's inputs equals XᵀX of the final hidden states."""
    import lm_head_quality
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 64, (3, 7))
    sigma = lm_head_quality.head_sigma(model, ids)
    with torch.no_grad():
        h = torch.cat([model(row[None], output_hidden_states=True).hidden_states[-1][0] for row in ids])
    assert sigma.shape == (32, 32)
    assert torch.allclose(sigma, (h.t().double() @ h.double()).float(), rtol=1e-4, atol=1e-4)
