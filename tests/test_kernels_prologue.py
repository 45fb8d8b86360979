"""kernels/prologue.py (the split-K GEMM's x^T copy and zeroing of out in one launch) against its torch reference,
on odd shapes and batch sizes; and gemm_half2 with it switched on."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_kernels import DEVICE, check, needs_triton, reference64  # first: sets TRITON_INTERPRET
from test_kernels_gemm_half2 import make
from quantease.kernels import gemm_half2, prologue

ROOT = Path(__file__).resolve().parents[1]


@needs_triton
@pytest.mark.parametrize("m", (1, 3, 5, 16, 30, 65))
@pytest.mark.parametrize("k,n", ((300, 40), (1100, 24), (128, 700)))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_transpose_and_zero(m, k, n, dtype):
    g = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k + 3, generator=g).to(dtype).to(DEVICE)[:, :k]  # a row stride that is not K
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    xt, sk, sm = prologue.prologue(x, out, True, True)
    assert xt.shape == (k, m) and (sk, sm) == (m, 1)
    assert torch.equal(xt, x.t().contiguous())  # a copy: bit-exact
    assert torch.equal(out, torch.zeros_like(out))


@needs_triton
def test_one_part_only():
    x = torch.randn(5, 300).half().to(DEVICE)
    out = torch.full((5, 40), 7.0).half().to(DEVICE)
    xt, sk, sm = prologue.prologue(x, out, False, True)  # zeroing only: x itself comes back
    assert xt is x and (sk, sm) == (1, 300) and torch.equal(out, torch.zeros_like(out))
    out.fill_(7.0)
    xt, _, _ = prologue.prologue(x, out, True, False)  # the copy only: out untouched
    assert torch.equal(xt, x.t().contiguous()) and bool((out == 7.0).all())


@needs_triton
@pytest.mark.parametrize("m", (3, 16, 30))
def test_gemm_half2_with_the_fused_prologue(m, monkeypatch):
    """gemm_half2 with the outliers gathered from x^T and K split: the same y with the one-launch prologue."""
    monkeypatch.setattr(gemm_half2, "FUSED_PROLOGUE", True)
    w, p, x, b, out = make(50, 900, -1, 0.05, False, m, torch.float16, True, seed=m)
    called = []
    real = prologue.prologue
    monkeypatch.setattr(prologue, "prologue", lambda *a, **kw: called.append(1) or real(*a, **kw))
    y = gemm_half2.qgemm_half2(x, p, b, out, config=gemm_half2.pick_config(m)[:3] + (2, 2), gather_x=False,
                               outlier_path="fused")
    assert called  # split 2 and x^T: the prologue ran
    check(y, reference64(x, w, 3, -1, 900, b), torch.float16)


@needs_triton
@pytest.mark.parametrize("flag, want", (("1", "True"), ("0", "False"), ("", "True"),
                                        ("yes", "$QUANTEASE_PROLOGUE='yes': 0")))
def test_prologue_env(flag, want):
    """$QUANTEASE_PROLOGUE turns the one-launch prologue on or off at import (vLLM's processes inherit it); anything
    else is a one-line error naming the variable."""
    code = ("from quantease.errors import QuantEaseError\n"
            "try:\n    from quantease.kernels import gemm_half2; print(gemm_half2.FUSED_PROLOGUE)\n"
            "except QuantEaseError as e:\n    print(e)")
    env = dict(os.environ, QUANTEASE_PROLOGUE=flag, PYTHONPATH=str(ROOT))
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert want in got.stdout.strip().splitlines()[-1], got.stdout + got.stderr
