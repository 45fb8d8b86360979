"""Cross-layer L2 prefetch (kernels/xprefetch.py): the setting, the links learned in execution order, the regions
handed to the kernels, and -- on a GPU -- that a chain of layers gives bitwise the same outputs with the tail on."""
import gc

import pytest
import torch

from test_kernels import DEVICE  # first: sets TRITON_INTERPRET
from test_kernels_pdl import chain_layers
from quantease.errors import QuantEaseError
from quantease.kernels import ops, xprefetch

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="the prefetch tail is inline PTX: CUDA only")


@pytest.fixture(autouse=True)
def fresh_chain(monkeypatch):
    monkeypatch.setattr(xprefetch, "_last", None)  # no link from another test's last layer


def layer(n, k=64, r=0, device="cpu"):
    """A prepared-dict stand-in: half2 words [n, k // 32 * 3] int32, outlier tables [n, r]."""
    p = dict(words=torch.zeros(n, k // 32 * 3, dtype=torch.int32, device=device), outlier_idx=None, outlier_val=None)
    if r:
        p["outlier_idx"] = torch.zeros(n, r, dtype=torch.int16, device=device)
        p["outlier_val"] = torch.zeros(n, r, dtype=torch.float16, device=device)
    return p


def nbytes(t):
    return t.numel() * t.element_size()


def test_setting(monkeypatch):
    monkeypatch.delenv(xprefetch.ENV, raising=False)
    assert xprefetch.setting()[0] == 0
    for raw, want in (("0", (0, 0, False)), ("16", (xprefetch.BULK, 16 << 20, False)),
                      ("0.5:lines", (xprefetch.LINES, 1 << 19, False)), ("8:bulk:all", (xprefetch.BULK, 8 << 20, True)),
                      ("4:all:lines", (xprefetch.LINES, 4 << 20, True))):
        monkeypatch.setenv(xprefetch.ENV, raw)
        assert xprefetch.setting() == want, raw
    for bad in ("yes", "-1", "8:rows", "4096", "8:bulk:lines"):
        monkeypatch.setenv(xprefetch.ENV, bad)
        with pytest.raises(QuantEaseError, match="QUANTEASE_XPREFETCH"):
            xprefetch.setting()


def test_links_follow_the_first_run_and_never_change():
    a, b, c = layer(8), layer(16), layer(32)
    for p in (a, b, c, a, b, c, b, a):  # a second step (c -> a) and another order later: no new links
        xprefetch.visit(p)
    assert xprefetch.successor(a)["words"] is b["words"]
    assert xprefetch.successor(b)["words"] is c["words"]
    assert xprefetch.successor(c) is None  # a ran before: the next step's first layer is no successor


def test_regions_in_chain_order_tables_first_up_to_the_cap():
    a, b, c, d = layer(8), layer(64, r=4), layer(128), layer(256)
    for p in (a, b, c, d):
        xprefetch.visit(p)
    everything = [(b["outlier_idx"].data_ptr(), nbytes(b["outlier_idx"])),
                  (b["outlier_val"].data_ptr(), nbytes(b["outlier_val"])),
                  (b["words"].data_ptr(), nbytes(b["words"])), (c["words"].data_ptr(), nbytes(c["words"]))]
    assert xprefetch.regions(a, 1 << 20, a["words"].device) == everything  # MAX_REGIONS: d's words left out
    assert xprefetch.regions(b, 1 << 20, b["words"].device) == everything[3:] + [(d["words"].data_ptr(),
                                                                                   nbytes(d["words"]))]
    # a cap inside b's words: the tables, then the words' prefix rounded down to 16 bytes; nothing of c
    cap = nbytes(b["outlier_idx"]) + nbytes(b["outlier_val"]) + 100
    assert xprefetch.regions(a, cap, a["words"].device) == everything[:2] + [(b["words"].data_ptr(), 96)]
    assert xprefetch.regions(d, 1 << 20, d["words"].device) == []
    assert xprefetch.regions(a, 1 << 20, torch.device("meta")) == []  # only tensors on the launch's device


def test_links_hold_no_memory():
    a, b = layer(8), layer(16)
    xprefetch.visit(a)
    xprefetch.visit(b)
    del b
    gc.collect()
    assert xprefetch.successor(a) is None
    assert xprefetch.regions(a, 1 << 20, a["words"].device) == []


def test_launch_args_off_on_cpu(monkeypatch):
    monkeypatch.setenv(xprefetch.ENV, "16")
    a, b = layer(8), layer(16)
    xprefetch.visit(a)
    xprefetch.visit(b)
    args = xprefetch.launch_args(a, torch.zeros(1, 64), 4)
    assert args["XPF"] == 0 and args["XPF_N"] == 0 and args["XPF_LANES"] == 128  # the interpreter runs no PTX
    assert args["xlast"] == 0
    assert [args[f"xn{i}"] for i in range(xprefetch.MAX_REGIONS)] == [0] * xprefetch.MAX_REGIONS


def test_the_dispatch_forms_the_links(monkeypatch):
    """Through ops.qlinear_prepared's Triton path (the interpreter here, which launches no prefetch): links in run
    order, and none while the setting is off."""
    layers = [p for _, p in chain_layers(3, 64, -1, 0.05, False)]
    x = torch.randn(1, 64, dtype=torch.float16, device=DEVICE)
    monkeypatch.setenv(xprefetch.ENV, "0")
    for p in layers:
        ops.qlinear_prepared(x, p, backend="triton")
    assert all(xprefetch.successor(p) is None for p in layers)
    monkeypatch.setenv(xprefetch.ENV, "8")
    for _ in range(2):
        for p in layers:
            ops.qlinear_prepared(x, p, backend="triton")
    assert xprefetch.successor(layers[0])["words"] is layers[1]["words"]
    assert xprefetch.successor(layers[1])["words"] is layers[2]["words"]
    assert xprefetch.successor(layers[2]) is None


@gpu
@pytest.mark.parametrize("m", (1, 2, 16))
@pytest.mark.parametrize("setting", ("1", "0.25:lines", "64", "2:all"))
def test_chain_bitwise_the_same_with_the_tail(monkeypatch, m, setting):
    """A chain of four layers (0.5% outliers), each fed the same x: the prefetch tail (the next layers' tables and
    words; 1 MiB, 256 KiB per line, all of it, 2 MiB from every program) changes no output bit, and the links follow the run order."""
    layers = chain_layers(4, 512, -1, 0.005, False)
    x = torch.randn(m, 512, dtype=torch.float16, device="cuda")
    monkeypatch.setenv(xprefetch.ENV, "0")
    want = [ops.qlinear_prepared(x, p) for _, p in layers]
    monkeypatch.setenv(xprefetch.ENV, setting)
    for _ in range(2):  # the first pass forms the links, the second launches with them
        got = [ops.qlinear_prepared(x, p) for _, p in layers]
    torch.cuda.synchronize()
    for y, z in zip(got, want):
        assert torch.equal(y, z)
    ps = [p for _, p in layers]
    for p, q in zip(ps, ps[1:]):
        assert xprefetch.successor(p)["words"] is q["words"]
    args = xprefetch.launch_args(ps[0], x, 1)
    assert args["XPF"] == (xprefetch.LINES if "lines" in setting else xprefetch.BULK) and args["XPF_N"] >= 1
    assert args["xlast"] == (0 if "all" in setting else torch.cuda.get_device_properties(0).multi_processor_count)
