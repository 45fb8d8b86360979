"""GEMV v1 (kernels/gemv.py) on 3-bit layers: with half2 the default, QUANTEASE_GEMV=v1 is the only way the
dispatcher still sends 3-bit fp16/bf16 rows there, so these cases pin that path (and the env switch) down."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported

from test_kernels import needs_triton, run_case  # noqa: E402

from quantease.kernels import gemv, gemv_half2  # noqa: E402


pytestmark = pytest.mark.usefixtures("keep_planes")  # plane kernels called directly (conftest.py)



@needs_triton
@pytest.mark.parametrize("n,k,group_size,sym,fraction,m,dtype,bias", (
    (33, 96, -1, True, 0.05, 1, torch.float16, True),
    (40, 200, 32, False, 0.0, 2, torch.bfloat16, False),
    (96, 160, 64, True, 0.02, 1, torch.bfloat16, True),
    (17, 768, -1, False, 0.01, 2, torch.float16, False),
))
def test_v1_on_request(monkeypatch, n, k, group_size, sym, fraction, m, dtype, bias):
    calls = []
    real_v1, real_h2 = gemv.qgemv, gemv_half2.qgemv_half2
    monkeypatch.setattr(gemv, "qgemv", lambda *a, **kw: calls.append("v1") or real_v1(*a, **kw))
    monkeypatch.setattr(gemv_half2, "qgemv_half2", lambda *a, **kw: calls.append("half2") or real_h2(*a, **kw))
    monkeypatch.setenv(gemv_half2.GEMV_ENV, "v1")
    run_case(n, k, 3, group_size, fraction, sym, m, dtype, bias, seed=n)
    monkeypatch.setenv(gemv_half2.GEMV_ENV, "half2")
    run_case(n, k, 3, group_size, fraction, sym, m, dtype, bias, seed=n)
    assert calls == ["v1", "half2"]
