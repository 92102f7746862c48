"""The `lmserve` command line."""

from __future__ import annotations

import argparse
import sys

from lmserve.weights.errors import ModelLoadError
from lmserve.weights.resolve import DEFAULT_MODEL


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description="Efficient LLM inference and serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one or more prompts (batched) and print the replies")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="directory, .gguf file or bundled model name")
    gen.add_argument("--tokenizer", default=None, help="tokenizer path, when not the model's own")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="send prompts as they are, without the chat template")
    return parser


def _generate(args: argparse.Namespace) -> None:
    from lmserve.llm import LLM
    from lmserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_num_seqs=len(args.prompts))
    if args.no_chat or not llm.get_tokenizer().chat_template:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    for output in outputs:
        print(output.outputs[0].text.strip())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _generate(args)
    except (ModelLoadError, ValueError) as e:
        print(f"lmserve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
