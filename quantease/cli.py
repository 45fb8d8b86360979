"""The `quantease` command. Each subcommand lives in its own module with add_arguments(parser) and run(args)."""
import argparse
import importlib
import sys

from quantease.errors import QuantEaseError

# subcommand -> (module, one-line help); modules load lazily so `quantease --help` stays fast
COMMANDS = {
    "quantize": ("quantease.quantize.pipeline", "quantize a Hugging Face model into a quantease checkpoint"),
    "eval": ("quantease.eval", "perplexity of an fp16 or quantized model folder"),
    "dequantize": ("quantease.format.checkpoint", "write a plain fp16 checkpoint from a quantease one"),
    "serve": ("quantease.server.serve", "serve a checkpoint through vLLM's OpenAI-compatible server"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="quantease", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    mod = importlib.import_module(COMMANDS[args.command][0])
    if extra and not getattr(mod, "ACCEPTS_EXTRA_ARGS", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return mod.run(args) or 0
    except QuantEaseError as e:
        print(f"quantease {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quantease {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
