"""`lmserve generate PROMPT...`: answer prompts in one batch with the in-process engine and print the replies."""

from __future__ import annotations

import argparse

from lmserve.commands.engine_args import add_engine_args, engine_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="answer one or more prompts (batched) and print the replies")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    add_engine_args(parser)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-chat", action="store_true", help="send prompts as they are, without the chat template")


def run(args: argparse.Namespace) -> int:
    from lmserve.llm import LLM
    from lmserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    options = engine_options(args)
    options.setdefault("max_num_seqs", len(args.prompts))
    llm = LLM(**options)
    if args.no_chat or not llm.get_tokenizer().chat_template:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    for output in outputs:
        print(output.outputs[0].text.strip())
    return 0
