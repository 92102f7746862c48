"""The `lmserve` command line."""

from __future__ import annotations

import argparse
import sys

from lmserve.weights.errors import ModelLoadError
from lmserve.weights.resolve import DEFAULT_MODEL


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description="Efficient LLM inference and serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="greedily generate a reply to one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="directory, .gguf file or bundled model name")
    gen.add_argument("--tokenizer", default=None, help="tokenizer path, when not the model's own")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--no-chat", action="store_true", help="send the prompt as is, without the chat template")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lmserve.generate import generate_text

    try:
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
        print(generate_text(args.prompt, args.model, args.max_tokens, not args.no_chat, args.dtype, args.tokenizer))
    except (ModelLoadError, ValueError) as e:
        print(f"lmserve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
