"""Programmatic dependent launch (kernels/pdl.py): the switch, and -- on a GPU -- chains of layers where each kernel
reads the one before's output, so that a read of x or a write of y ahead of gdc_wait() shows up as a wrong result.

The chain ping-pongs between two buffers (layer i reads A and writes B, layer i + 1 reads B and writes A): a read
too early sees the poison or the previous replay's values (read after write), a write too early clobbers the x the
kernel before is still reading (write after read).  Each layer is checked against the float64 reference of the
input it actually got, so errors do not compound.
"""
import pytest
import torch

from test_kernels import DEVICE, check, make_weight, reference64  # first: sets TRITON_INTERPRET
from quantease.errors import QuantEaseError
from quantease.kernels import gemv_half2, ops, pdl, prepare_weights

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="PDL is a CUDA launch attribute")


def test_off_on_cpu_and_by_env(monkeypatch):
    x = torch.zeros(2, 8)
    assert not pdl.enabled(x)
    monkeypatch.setenv(pdl.ENV, "0")
    assert not pdl.enabled(x)
    monkeypatch.setenv(pdl.ENV, "late")
    assert pdl.enabled(x) == 0  # CPU: never
    assert pdl.enabled(x, pdl.LATE) == 0
    monkeypatch.setenv(pdl.ENV, "yes")
    with pytest.raises(QuantEaseError, match="QUANTEASE_PDL"):
        pdl.enabled(x)


def chain_layers(count, n, group_size, fraction, sym):
    layers = []
    for i in range(count):
        w = make_weight(n, n, 3, group_size, fraction, sym, seed=10 + i)
        layers.append((w, gemv_half2.add_layout(prepare_weights(*w, 3, group_size, n))))
    return layers


def run_chain(layers, bufs):
    for i, (_, p) in enumerate(layers):
        ops.qlinear_prepared(bufs[i % 2], p, out=bufs[(i + 1) % 2])


def check_chain(layers, x0, final):
    """Runs the chain again one layer at a time, synchronised and with PDL off, from the same x0, checks each
    layer's output against the float64 reference of its input, then the chained run's final output against it."""
    x = x0
    for w, p in layers:
        y = torch.empty_like(x)
        ops.qlinear_prepared(x, p, out=y)
        torch.cuda.synchronize()
        check(y, reference64(x, w, 3, p["group_size"], x.shape[1], None), x.dtype)
        x = y
    check(final, x.to(torch.float64), x.dtype)  # not bitwise: split-K atomics add in any order


@gpu
@pytest.mark.parametrize("m", (1, 2, 16, 64))
@pytest.mark.parametrize("graph", (False, True))
@pytest.mark.parametrize("mode", ("1", "late"))
def test_chain_of_dependent_layers(m, graph, mode, monkeypatch):
    monkeypatch.setenv(pdl.ENV, mode)
    layers = chain_layers(4, 2048, -1, 0.005, False)
    want = pdl.MODES[mode] if torch.cuda.get_device_capability()[0] >= 9 else 0
    assert pdl.enabled(torch.zeros(1, device="cuda")) == want
    bufs = [torch.empty(m, 2048, device="cuda", dtype=torch.float16) for _ in range(2)]
    run_chain(layers, bufs)  # compile outside any capture
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run_chain(layers, bufs)
    for _ in range(3):  # a new x each time: a read of the previous run's values cannot pass
        x0 = torch.randn(m, 2048, device="cuda", dtype=torch.float16) * 0.1  # ~3x per layer: stays in fp16 range
        bufs[0].copy_(x0)
        bufs[1].fill_(float("nan"))
        g.replay() if graph else run_chain(layers, bufs)
    torch.cuda.synchronize()
    final = bufs[len(layers) % 2].clone()
    monkeypatch.setenv(pdl.ENV, "0")
    check_chain(layers, x0, final)
