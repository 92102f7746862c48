"""The `lmserve` command line: one subcommand per module in lmserve.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

from lmserve.weights.errors import ModelLoadError

COMMANDS = ["generate", "serve", "chat", "bench"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmserve", description="Efficient LLM inference and serving.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(f"lmserve.commands.{name}") for name in COMMANDS}
    for module in modules.values():
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args)
    except (ModelLoadError, ValueError) as e:
        print(f"lmserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
