"""`quantease serve` on the real SmolLM2-135M-Instruct, RTN 3-bit groups of 64 (few calibration samples): the
OpenAI client end to end, and greedy tokens equal transformers' on the same checkpoint (float32)."""
import json
import urllib.request

import pytest

from test_serve import client, greedy_reference, quantize, served_greedy, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(request, tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("smol")
    ckpt = quantize(smollm2_dir, tmp / "smollm2-q3", "--method", "rtn", "--bits", 3, "--group-size", 64)
    return ckpt, start_server(request, ckpt, tmp, "--dtype", "float32")


def test_smollm2_greedy_matches_transformers(smol):
    ckpt, server = smol
    prompt_ids, ref = greedy_reference(ckpt)
    assert served_greedy(server, "smollm2-q3", prompt_ids) == ref


def test_smollm2_chat(smol):
    _, server = smol
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["smollm2-q3"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = c.chat.completions.create(model="smollm2-q3", messages=msgs, max_tokens=6, temperature=0)
    text = chat.choices[0].message.content
    assert text.strip() and chat.usage.completion_tokens <= 6
    stream = c.chat.completions.create(model="smollm2-q3", messages=msgs, max_tokens=6, temperature=0,
                                       stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text


def test_smollm2_quantization_route(smol):
    _, server = smol
    with urllib.request.urlopen(server.url + "/v1/quantization", timeout=30) as r:
        rep = json.loads(r.read())
    assert rep["method"] == "rtn" and rep["bits"] == 3 and rep["outlier_fraction"] == 0
    assert rep["quantized_layers"] == 30 * 7
    assert 3.3 < rep["bits_per_weight"] < 3.5  # 3 + (16 + 8) / 64
