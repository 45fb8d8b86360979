"""Device side: greedy tokens of the vLLM server == transformers (quantease.runtime, same checkpoint, CUDA)."""
import json, os, sys, time, urllib.request
import torch
from transformers import AutoTokenizer
import transformers.quantizers  # noqa: F401  (before quantease.runtime: works around a circular import, reported)
import quantease.runtime

url, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
N = 16
DEV = os.environ.get("CHECK_DEVICE", "cuda")
tok = AutoTokenizer.from_pretrained(ckpt)
name = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
rep = json.load(urllib.request.urlopen(url + "/v1/quantization"))
res = {"quantization": {k: rep[k] for k in ("method", "bits", "group_size", "outlier_fraction", "bits_per_weight")}}
served = {}
for p in PROMPTS:
    ids = tok(p).input_ids
    body = {"model": name, "prompt": ids, "max_tokens": N, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    served[p] = json.load(urllib.request.urlopen(req))["choices"][0]["token_ids"]
for dtype in (torch.float16, torch.float32):
    t0 = time.time()
    m = quantease.runtime.load(ckpt, device=DEV, dtype=dtype)
    rows = []
    for p in PROMPTS:
        ids = torch.tensor([tok(p).input_ids], device=DEV)
        with torch.no_grad():
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, do_sample=False)
        ref = g[0, ids.shape[1]:].tolist()
        same = next((i for i, (a, b) in enumerate(zip(ref, served[p])) if a != b), N)
        rows.append({"prompt": p, "equal": ref == served[p], "first_diff": same, "vllm": tok.decode(served[p]), "hf": tok.decode(ref)})
    res[f"hf_{str(dtype).split('.')[-1]}"] = rows
    del m; torch.cuda.empty_cache() if DEV == "cuda" else None
    print(dtype, "equal:", [r["equal"] for r in rows], "first_diff:", [r["first_diff"] for r in rows], f"{time.time()-t0:.0f}s")
json.dump(res, open(out, "w"), indent=1)
for r in res["hf_float16"]:
    print(repr(r["prompt"]), "->", repr(r["vllm"]))
