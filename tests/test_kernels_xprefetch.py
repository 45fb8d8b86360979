"""Cross-layer L2 prefetch (kernels/xprefetch.py): the setting, the links learned in execution order, the regions
handed to the kernels, and -- on a GPU -- that a chain of layers gives bitwise the same outputs with the tail on."""
import gc
import itertools

import pytest
import torch

from test_kernels import DEVICE  # first: sets TRITON_INTERPRET (before triton is imported)
import triton
import triton.language as tl
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


@triton.jit
def _slices(out_ptr, nbytes, xlast, LANES: tl.constexpr, MODE: tl.constexpr):
    """Each program's slicing of the region [0, nbytes), as the tail computes it, stored for the test."""
    pid = tl.program_id(0)
    rel, issuers = xprefetch.issuer(pid, tl.num_programs(0), xlast)
    lanes = tl.arange(0, LANES)
    if MODE == 1:
        start, size, warp = xprefetch.bulk_slice(0, nbytes, rel, issuers, LANES)
        tl.store(out_ptr + pid * 3 + tl.arange(0, 4), tl.where(tl.arange(0, 4) == 0, start, tl.where(
            tl.arange(0, 4) == 1, size.to(tl.int64), warp.to(tl.int64))), mask=tl.arange(0, 4) < 3)
    else:
        at, size, piece = xprefetch.line_slice(0, nbytes, rel, issuers, LANES)
        tl.store(out_ptr + pid * (2 * LANES + 1) + lanes, at)
        tl.store(out_ptr + pid * (2 * LANES + 1) + LANES + lanes, size.to(tl.int64))
        tl.store(out_ptr + pid * (2 * LANES + 1) + 2 * LANES, piece.to(tl.int64))


def prefetched(mode, nbytes, nprog, xlast, lanes):
    """The byte intervals the tail's prefetches cover for a region [0, nbytes), per the asm statements' rules."""
    width = 3 if mode == xprefetch.BULK else 2 * lanes + 1
    out = torch.full((nprog * width,), -1, dtype=torch.int64)
    _slices[(nprog,)](out, nbytes, xlast, LANES=lanes, MODE=mode)
    spans = []
    for row in out.view(nprog, width).tolist():
        if mode == xprefetch.BULK:  # warp w: [start + w * per_warp, + min(per_warp, size - w * per_warp)) if > 0
            start, size, warp = row
            spans += [(start + w * warp, start + w * warp + min(warp, size - w * warp))
                      for w in range(lanes // 32) if size - w * warp > 0]
        else:  # thread t: the lines at at + 128 j for 128 j < size, j < cdiv(piece, 128)
            piece = row[-1]
            for at, size in zip(row[:lanes], row[lanes:2 * lanes]):
                spans += [(at + 128 * j, at + min(128 * (j + 1), size)) for j in range(-(-piece // 128))
                          if 128 * j < size]
    return sorted(spans)


@pytest.mark.parametrize("mode", (xprefetch.BULK, xprefetch.LINES))
def test_the_issuers_cover_the_region_exactly(mode):
    """Every byte of the region once, nothing outside it, from the last xlast programs only (all for xlast 0); the
    slicing the asm statements get (bulk: per warp, lines: per thread) -- what the GPU cannot show, since a
    prefetch changes no result."""
    for nbytes, nprog, xlast, lanes in itertools.product((16, 4096, 16 * 12345), (1, 3, 40), (0, 2, 64),
                                                         (32, 128)):
        spans = prefetched(mode, nbytes, nprog, xlast, lanes)
        covered = 0
        for (a, b), nxt in zip(spans, spans[1:] + [(nbytes, None)]):
            assert 0 <= a < b <= nxt[0] and a == covered, (nbytes, nprog, xlast, lanes, a, b)
            covered = b
        assert covered == nbytes, (nbytes, nprog, xlast, lanes)
    # issuers: with 200 programs and xlast 2 only programs 198 and 199 have a share
    out = torch.full((200 * 3,), -1, dtype=torch.int64)
    _slices[(200,)](out, 4096, 2, LANES=32, MODE=xprefetch.BULK)
    assert [i for i, (_, size, _) in enumerate(out.view(200, 3).tolist()) if size > 0] == [198, 199]


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
    for p in layers + layers[:1]:  # and the next step's first layer: no link back to it
        ops.qlinear_prepared(x, p, backend="triton")
    assert xprefetch.successor(layers[0])["words"] is layers[1]["words"]
    assert xprefetch.successor(layers[1])["words"] is layers[2]["words"]
    assert xprefetch.successor(layers[2]) is None


@gpu
@pytest.mark.parametrize("m", (1, 2, 16))
@pytest.mark.parametrize("setting", ("1", "0.25:lines", "64", "2:all"))
def test_chain_bitwise_the_same_with_the_tail(monkeypatch, m, setting):
    """A chain of four layers (0.5% outliers), each fed the same x: the prefetch tail (the next layers' tables and
    words; 1 MiB, 256 KiB per line, all of it, 2 MiB from every program) changes no output bit, and the links
    follow the run order."""
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


def test_a_transformers_model_links_in_its_run_order(tmp_path, monkeypatch):
    """A tiny Llama checkpoint loaded by from_pretrained, one forward on the Triton path (the interpreter here): each
    linear's successor is the one the decoder runs next -- q, k, v, o, gate, up, down, then the next layer's q."""
    from transformers import AutoModelForCausalLM

    from ckpt_helpers import make_checkpoint, tokens
    from conftest import make_tiny_llama
    from test_checkpoint import TINY

    src = make_tiny_llama(tmp_path / "tiny", **TINY)
    layers, _ = make_checkpoint(src, tmp_path / "q", fraction=0.05)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float16).to(DEVICE)
    monkeypatch.setenv("QUANTEASE_KERNEL_BACKEND", "triton")
    monkeypatch.setenv(xprefetch.ENV, "8")
    with torch.no_grad():
        model(tokens(1, 2).to(DEVICE))
    order = [f"model.layers.{i}.{name}" for i in range(model.config.num_hidden_layers)
             for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(order) == sorted(layers)
    anchors = [xprefetch._anchor(model.get_submodule(name).qweight._quantease_prepared[1]) for name in order]
    for name, a, b in zip(order, anchors, anchors[1:]):
        nxt = xprefetch.successor({"words": a})
        assert nxt is not None and xprefetch._anchor(nxt) is b, name
    assert xprefetch.successor({"words": anchors[-1]}) is None
