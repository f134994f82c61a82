"""`specee-pc` command line: one module per subcommand, each with a main(argv)."""
import argparse
import importlib
import sys
from typing import List, Optional

from .. import __version__

SUBCOMMANDS = {
    "run": ("specee_pc.cli.run", "chat with a GGUF model, or answer one prompt (-p)"),
    "serve": ("specee_pc.cli.serve", "an OpenAI-compatible HTTP server for a GGUF model (needs the [server] extra)"),
    "calibrate": ("specee_pc.cli.calibrate", "make SpecEE predictors for a model (needs torch)"),
    "convert": ("specee_pc.cli.convert", "PyTorch predictor weights to a predictor GGUF; --inspect one"),
    "bench": ("specee_pc.cli.bench", "decode speed and output quality against llama.cpp, side by side"),
    "eval": ("specee_pc.cli.eval", "task accuracy, perplexity and KL divergence with and without early exit"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="specee-pc",
        description="Speculative early exiting (SpecEE) for GGUF models on llama.cpp.",
        epilog="Run 'specee-pc COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"specee-pc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0].startswith("-") and argv[0] not in ("--version",):
        parser.print_help(sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return module.main(argv[1:])
