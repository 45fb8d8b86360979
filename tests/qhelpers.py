"""Small deterministic layers for the quantizer tests."""
import torch


def make_layer(n=16, k=48, tokens=256, seed=0, corr=0.3):
    """W [n, k] and Sigma = X^T X of correlated inputs X [tokens, k] (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + corr * torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(tokens, k, generator=g) @ mix
    x = x * (1 + 3 * torch.rand(k, generator=g))  # uneven channel scales, as in LLM activations
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x.T @ x


def f_of(w, wq, sigma):
    e = (w - wq).double()
    return float(((e @ sigma.double()) * e).sum())


def run_interpreted(script):
    """Run a check script in a fresh process under Triton's CPU interpreter (it must be set before triton is
    imported); passes when the script prints ok."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
