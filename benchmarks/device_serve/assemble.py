"""Device side: rebuild the SmolLM2 quantized checkpoint from its carried parts.
parts/: rest.safetensors (every tensor but the embedding), embed_q8_0.bin (the GGUF's Q8_0 token_embd, the
exact source of the fp16 embedding: w = fp16(d * q)), side files (config.json, tokenizer, report)."""
import shutil, sys
from pathlib import Path
import numpy as np, torch
from safetensors.torch import load_file, save_file

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
raw = np.fromfile(src / "embed_q8_0.bin", dtype=np.uint8).reshape(-1, 34)
d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
q = raw[:, 2:34].copy().view(np.int8).astype(np.float32)
emb = torch.from_numpy((d * q).reshape(49152, 576)).half()
t = load_file(src / "rest.safetensors")
t["model.embed_tokens.weight"] = emb
save_file(t, out / "model.safetensors", metadata={"format": "pt"})
for f in src.iterdir():
    if f.name not in ("rest.safetensors", "embed_q8_0.bin"):
        shutil.copy(f, out / f.name)
print("assembled", out, sorted(p.name for p in out.iterdir()))
