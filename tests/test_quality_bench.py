"""benchmarks/quality.py's bookkeeping (no model): rows keyed by config + code merge into one table, targets per
code, the history below the marker kept, deadline estimates; benchmarks/plots.py reads that table back."""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plots  # noqa: E402
import quality  # noqa: E402

MACHINE = "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, fp16 compute"


def row(name, ppl, code, date, wall=80.0, bits=3.035):
    return dict(name=name, ppl=ppl, windows=148, bits_per_weight=16.0 if name == "fp16" else bits, seconds=50.0,
                quant_seconds=30.0, wall_seconds=wall, machine=MACHINE, code=code, nsamples=128, seqlen=2048,
                eval_limit=None, date=date, **({} if name == "fp16" else dict(target="q")))


def args(**kw):
    a = dict(nsamples=128, seqlen=2048, eval_limit=None, device="cuda", title="", command="cmd", in_process=True,
             render=True, configs=list(quality.CONFIGS), note="")
    a.update(kw)
    return argparse.Namespace(**a)


def two_code_rows():
    old, new = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
    return [row("fp16", 20.0, old, "2026-11-24 10:12 UTC", wall=14),
            row("gptq-3", 60.0, old, "2026-11-24 10:13 UTC", wall=70),
            row("quantease-3", 61.0, old, "2026-11-24 10:14 UTC"),
            row("quantease-3+1%", 44.0, old, "2026-11-24 10:15 UTC"),
            row("gptq-3", 58.0, new, "2026-11-24 11:40 UTC"),
            row("quantease-3", 50.0, new, "2026-11-24 11:41 UTC"),
            row("quantease-3+1%", 30.0, new, "2026-11-24 11:42 UTC")]


def test_table_keeps_both_codes_and_targets_per_code(tmp_path):
    out = tmp_path / "quality.md"
    out.write_text("old heading\n" + quality.HISTORY + "\n### history table\n| x | 1 | 2 |\n")
    quality.write_md(two_code_rows(), args(), out)
    text = out.read_text()
    assert text.count("| gptq-3 |") == 2 and "| bbbbbbbbbbbb |" in text and "| aaaaaaaaaaaa |" in text
    assert "old heading" not in text and text.endswith(quality.HISTORY + "\n### history table\n| x | 1 | 2 |\n")
    # old code: excess 41 vs 40 -> -2.5% (not met); 1 - 24/40 = 40% closed (not met)
    assert "code aaaaaaaaaaaa: quantease-3 excess ppl 41.000 vs gptq-3 40.000: -2.5% smaller (target >= 10%: NOT met)" in text
    assert "code aaaaaaaaaaaa: quantease-3+1% closes 40.0% of gptq-3's gap to fp16 (target >= 60%: NOT met)" in text
    # new code, fp16 of the old code: 30 vs 38 -> 21.1% (met); 1 - 10/38 = 73.7% (met)
    assert "code bbbbbbbbbbbb: quantease-3 excess ppl 30.000 vs gptq-3 38.000: 21.1% smaller (target >= 10%: met)" in text
    assert "code bbbbbbbbbbbb: quantease-3+1% closes 73.7% of gptq-3's gap to fp16 (target >= 60%: met)" in text
    assert "Not run yet (no row of any code): quantease-3+0.5%," in text


def test_plot_reads_the_first_table_with_codes(tmp_path):
    quality.write_md(two_code_rows(), args(), tmp_path / "quality.md")
    (tmp_path / "quality.md").write_text((tmp_path / "quality.md").read_text()
                                         + "\n| config | bits/weight | ppl |\n|---|---|---|\n| rtn-9 | 9.0 | 1.0 |\n")
    rows, _ = plots.quality_rows(tmp_path)
    assert [(n, c) for n, _, _, c in rows][:3] == [("fp16", "aaaaaaaaaaaa"), ("gptq-3", "aaaaaaaaaaaa"),
                                                   ("gptq-3", "bbbbbbbbbbbb")]
    assert len(rows) == 7 and ("quantease-3", 3.035, 50.0, "bbbbbbbbbbbb") in rows


def test_a_config_is_done_only_for_the_code_that_ran_it():
    mine = quality.code_hash()
    rows = [row("gptq-3", 60.0, "aaaaaaaaaaaa", "d"), row("rtn-3", 600.0, mine, "d")]
    a = args(render=False)
    assert not quality.has_row(rows, "gptq-3", a) and quality.has_row(rows, "rtn-3", a)
    assert not quality.has_row(rows, "rtn-3", args(render=False, nsamples=16))  # another protocol


def test_estimate_from_earlier_rows(monkeypatch):
    monkeypatch.setattr(quality, "machine_now", lambda: MACHINE)
    rows = [row("rtn-3", 600.0, "a", "d", wall=46), row("quantease-3", 60.0, "a", "d", wall=80),
            row("quantease-3+1%", 40.0, "a", "d", wall=85), row("gptq-3", 58.0, "a", "d", wall=70)]
    assert quality.estimate(rows, "quantease-3", 0) == 80           # the same config
    assert quality.estimate(rows, "quantease-4", 0) == 85           # the slowest of its method
    assert quality.estimate(rows, "gptq-3-fpt", 0) == pytest.approx(70 * 1.3)  # target fp: second stream
    assert quality.estimate(rows, "rtn-4", 12) == 46                # the slowest of its method
    assert quality.estimate(rows[1:], "rtn-4", 12) == 12            # nothing alike: the session's slowest
    other = [dict(r, machine="CPU") for r in rows]
    assert quality.estimate(other, "quantease-3", 7) == 7           # another machine's times do not count
