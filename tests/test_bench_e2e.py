"""benchmarks/throughput.py and quant_time.py helpers: the synthetic checkpoints are real ones, the arithmetic holds."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quant_time  # noqa: E402
import throughput  # noqa: E402

QUANT_TIME = Path(quant_time.__file__).resolve()


def test_synthetic_quantease_checkpoint_is_valid(tmp_path):
    from quantease.format import checkpoint as ckpt

    size = throughput.make_checkpoint("quantease", tmp_path / "q", tiny=True, device="cpu")
    assert size > 0
    config, qc, quantized, tensors = ckpt.validate_checkpoint(tmp_path / "q")  # values too
    assert (qc["bits"], qc["outlier_fraction"]) == (3, 0.005)
    assert "lm_head" in qc["modules_to_not_convert"]
    assert len(quantized) == 7 * throughput.TINY["num_hidden_layers"]
    # RTN-grade: the stored layer is close to a 0.02-std normal draw, not noise of another scale
    _, dense = ckpt.dequantized_tensors(tmp_path / "q")
    w = dense["model.layers.0.mlp.down_proj.weight"].float()
    assert w.shape == (256, 512) and 0.01 < float(w.std()) < 0.03


def test_synthetic_gptq_layout():
    g = torch.Generator().manual_seed(0)
    t = throughput.gptq_layer(384, 512, g, "cpu")
    assert t["qweight"].shape == (64, 384) and t["qweight"].dtype == torch.int32
    assert t["scales"].shape == (4, 384) and t["qzeros"].shape == (4, 48)
    assert t["g_idx"].tolist() == [i // 128 for i in range(512)]


def test_table_speedup():
    rows = [dict(model="fp16", batch=1, new_tokens=128, decode_tok_s=100.0, tpot_ms=10.0),
            dict(model="quantease", batch=1, new_tokens=128, decode_tok_s=350.0, tpot_ms=2.9)]
    assert "| 1 | 100.0 | 10.00 | 350.0 | 2.90 | 3.50x |" in throughput.table(rows)


class FakeHist:
    def __init__(self, name, total, count):
        self.name, self.sum, self.count = name, total, count


class FakeLLM:
    def __init__(self, snaps):
        self.snaps = iter(snaps)

    def get_metrics(self):
        return next(self.snaps)


def test_vllm_metrics_delta():
    """Means over the observations between two snapshots, summed over engines; other metrics ignored."""
    ttft, itl = "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"
    llm = FakeLLM([[FakeHist(ttft, 1.0, 4), FakeHist(itl, 0.5, 10), FakeHist("vllm:other", 9.0, 9)],
                   [FakeHist(ttft, 1.2, 5), FakeHist(ttft, 0.3, 3), FakeHist(itl, 0.5, 10)]])
    before, after = throughput.histograms(llm), throughput.histograms(llm)
    assert before == {"vllm_ttft_ms": (1.0, 4), "vllm_itl_ms": (0.5, 10)}
    got = throughput.mean_ms(before, after)
    assert got.keys() == {"vllm_ttft_ms"}  # no new ITL observations: no mean
    assert abs(got["vllm_ttft_ms"] - 1e3 * 0.5 / 4) < 1e-9


def test_table_vllm_metrics():
    rows = [dict(model="fp16", batch=1, new_tokens=128, decode_tok_s=100.0, tpot_ms=10.0, vllm_ttft_ms=20.0,
                 vllm_tpot_ms=9.5, vllm_itl_ms=9.4)]
    text = throughput.table(rows)
    assert "| 1 | 20.00 / 9.50 / 9.40 |" in text
    assert "per-request metrics" not in throughput.table([dict(rows[0], vllm_ttft_ms=None, vllm_tpot_ms=None,
                                                               vllm_itl_ms=None)])


def test_quant_time_extrapolation():
    res = dict(method="gptq", status="done", total_s=100.0, peak_gib=9.0, blocks=[
        dict(end=1, seconds=30.0, quantize_weight_s=20.0, save_s=2.0),
        dict(end=2, seconds=20.0, quantize_weight_s=15.0, save_s=2.0),
        dict(end=3, seconds=22.0, quantize_weight_s=16.0, save_s=2.0)])
    row = quant_time.summarize(res, 3, "128 x 2048")
    assert row["per_block_s"] == pytest.approx(21.0)  # the first block (one-off compiles) left out
    assert row["fixed_s"] == pytest.approx(28.0)
    assert row["extrapolated_32_s"] == pytest.approx(28.0 + 30.0 + 31 * 21.0)
    cut = quant_time.summarize(dict(res, status="cut (deadline)", blocks=res["blocks"][:1]), 3, "")
    assert cut["per_block_s"] == 30.0 and "extrapolated_32_s" not in cut
    json.dumps(row)


def test_quant_time_runs_the_pipeline(tmp_path):
    # the timing wrappers stand in for pipeline.quantize_block / save_block: they must keep up with the pipeline's
    # signatures (save_block gained the fp-target stream; the old wrapper failed every method on the H200 run)
    r = subprocess.run([sys.executable, str(QUANT_TIME), "--tiny", "--methods", "gptq,quantease", "--blocks", "2",
                        "--work", str(tmp_path / "w"), "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(tmp_path / "quant_time.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert {m: rows[m]["status"] for m in rows} == {"gptq": "done", "quantease": "done"}
    assert all(int(rows[m]["blocks_done"]) == 2 for m in rows)


def test_quant_time_resumes_a_cut_run(tmp_path):
    # --resume: a run cut after block 0 (the pipeline's crash hook) continues in the next call from block 1, in the
    # same work folder, and the method's time is the sum of both calls
    base = [sys.executable, str(QUANT_TIME), "--tiny", "--resume", "--methods", "quantease", "--blocks", "3",
            "--work", str(tmp_path / "w")]
    env = dict(os.environ, QUANTEASE_INTERRUPT_AFTER_BLOCK="0")
    r = subprocess.run(base + ["--out", str(tmp_path / "o1")], capture_output=True, text=True, timeout=600, env=env)
    first = json.loads((tmp_path / "o1" / "quant_time_quantease.json").read_text())
    assert first["status"].startswith("cut") and [b["block"] for b in first["blocks"]] == [0], r.stdout[-2000:]
    r = subprocess.run(base + ["--out", str(tmp_path / "o2")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "o2" / "quant_time_quantease.json").read_text())
    assert res["status"] == "done" and [b["block"] for b in res["blocks"]] == [0, 1, 2]  # resumed, not redone
    assert [c["first_block"] for c in res["calls"]] == [0, 1]
    assert res["total_s"] == pytest.approx(sum(c["wall_s"] for c in res["calls"]))
    assert not (tmp_path / "w" / "q_quantease.partial").exists()  # a finished method leaves no state behind


def test_quant_time_whole_model_is_measured():
    blocks = [dict(end=i + 1, seconds=10.0, quantize_weight_s=6.0, save_s=1.0) for i in range(quant_time.FULL_BLOCKS)]
    res = dict(method="quantease", status="done", total_s=400.0, peak_gib=9.0, blocks=blocks,
               calls=[dict(first_block=0, wall_s=250.0), dict(first_block=20, wall_s=150.0)])
    row = quant_time.summarize(res, quant_time.FULL_BLOCKS, "128 x 2048")
    assert row["measured_32_s"] == 400.0 and row["calls"] == 2
    assert "MEASURED (2 call(s))" in quant_time.table([row])


def test_kernel_kinds_and_per_step_time():
    """The profile's kinds (first match wins: our kernels before any generic 'gemm') and the 1-token run's kernels
    subtracted from the (1 + N)-token run's, per step."""
    names = {"qgemv_half2_kernel": "quantease", "qgemm_half2_kernel": "quantease", "ell_add_kernel": "quantease",
             "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTT": "fp16 GEMM",
             "sm90_xmma_gemm_f16f16_f16f32": "fp16 GEMM",
             "void flash::FlashAttnFwdSm90<...>": "attention",
             # FlashAttention 3 as vLLM 0.26 runs it (run 7): a cutlass kernel, but attention
             "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>": "attention",
             "void vllm::reshape_and_cache_flash_kernel<unsigned short>": "attention",
             "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
             "direct_copy_kernel_cuda": "copy / fill",
             "void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::Half>": "copy / fill",
             "fused_add_rms_norm_kernel<c10::Half>": "norm / act / rope",
             "triton_poi_fused_mul_silu_0": "norm / act / rope",
             "void at::native::vectorized_elementwise_kernel": "other"}
    for name, kind in names.items():
        assert throughput.kernel_kind(name) == kind, name
    first = {"qgemv_half2_kernel": 10.0, "rms_norm_kernel": 2.0, "flash_fwd_prefill": 50.0}
    whole = {"qgemv_half2_kernel": 410.0, "rms_norm_kernel": 42.0, "flash_fwd_prefill": 50.0, "argmax": 4.0}
    per, kinds = throughput.per_step(first, whole, 4)
    assert per == {"qgemv_half2_kernel": 100.0, "rms_norm_kernel": 10.0, "flash_fwd_prefill": 0.0, "argmax": 1.0}
    assert kinds == {"quantease": 100.0, "norm / act / rope": 10.0, "attention": 0.0, "other": 1.0}


def test_model_variants():
    """MODEL@VAR=VALUE: the same checkpoint measured with a variable set; bad specs name the problem."""
    assert throughput.parse_model("quantease") == ("quantease", {})
    assert throughput.parse_model("quantease@QUANTEASE_PDL=1@X=a=b") == ("quantease",
                                                                          {"QUANTEASE_PDL": "1", "X": "a=b"})
    with pytest.raises(ValueError, match="unknown model 'int4'"):
        throughput.parse_model("int4@X=1")
    with pytest.raises(ValueError, match="'PDL' is not VAR=VALUE"):
        throughput.parse_model("quantease@PDL")
    assert throughput.file_tag("quantease@QUANTEASE_PDL=1") == "quantease_QUANTEASE_PDL_1"
    rows = [dict(model="quantease", batch=1, new_tokens=128, decode_tok_s=300.0, tpot_ms=3.3),
            dict(model="quantease@QUANTEASE_PDL=1", batch=1, new_tokens=128, decode_tok_s=330.0, tpot_ms=3.0),
            dict(model="fp16", batch=1, new_tokens=128, decode_tok_s=150.0, tpot_ms=6.6)]
    text = throughput.table(rows)
    assert "| batch | fp16 tok/s | fp16 TPOT ms | quantease tok/s" in text  # fp16 first, then in run order
    assert "| 1 | 150.0 | 6.60 | 300.0 | 3.30 | 330.0 | 3.00 | 2.00x | 2.20x |" in text


def test_engine_arguments():
    kw = dict(model="m", compilation_config={"cudagraph_capture_sizes": [1, 8]})
    assert throughput.engine_kwargs(kw, "") == kw
    got = throughput.engine_kwargs(kw, '{"async_scheduling": true, "compilation_config": {"cudagraph_mode": "FULL"}}')
    assert got == dict(model="m", async_scheduling=True,
                       compilation_config={"cudagraph_capture_sizes": [1, 8], "cudagraph_mode": "FULL"})
    assert kw["compilation_config"] == {"cudagraph_capture_sizes": [1, 8]}  # the caller's dict is left alone
    with pytest.raises(ValueError, match="JSON object"):
        throughput.engine_kwargs(kw, "[1]")
    bad = subprocess.run([sys.executable, throughput.__file__, "--models", "fp16", "--engine", "{nope"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "throughput.py:" in bad.stderr
