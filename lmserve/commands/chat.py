"""`lmserve chat [MODEL]`: talk to a model in the terminal; replies stream from an in-process engine.

Lines typed (or piped) are user turns; `/reset` starts a new conversation, `/exit` or end of input quits.
"""

from __future__ import annotations

import argparse
import sys

from lmserve.commands.engine_args import add_engine_args, engine_options

HELP = "commands: /reset clears the conversation, /exit quits (or Ctrl-D)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="interactive chat in the terminal (streams replies)")
    add_engine_args(parser, positional_model=True)
    parser.add_argument("--system", default=None, help="a system prompt for the conversation")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from lmserve.engine.config import EngineConfig
    from lmserve.engine.llm_engine import LLMEngine
    from lmserve.sampling_params import SamplingParams

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    options = engine_options(args)
    options.setdefault("max_num_seqs", 1)
    engine = LLMEngine(EngineConfig(**options))
    if not engine.tokenizer.chat_template:
        raise ValueError(f"{args.model} has no chat template; use `lmserve generate --no-chat` instead")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lmserve chat: {args.model} ({HELP})", file=sys.stderr)
    session = _Session(engine, params, args.system, interactive)
    return session.loop()


class _Session:
    def __init__(self, engine, params, system: str | None, interactive: bool) -> None:
        self.engine = engine
        self.params = params
        self.system = system
        self.interactive = interactive
        self.messages: list[dict[str, str]] = []
        self.turn = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def loop(self) -> int:
        while True:
            try:
                line = input("> " if self.interactive else "")
            except (EOFError, KeyboardInterrupt):
                if self.interactive:
                    print(file=sys.stderr)
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                self.reset()
                print("(conversation cleared)", file=sys.stderr, flush=True)
                continue
            if text.startswith("/") and " " not in text:
                print(f"(unknown command {text}; {HELP})", file=sys.stderr, flush=True)
                continue
            self.messages.append({"role": "user", "content": line})
            reply = self.reply()
            if reply is None:
                self.messages.pop()
            else:
                self.messages.append({"role": "assistant", "content": reply})
        return 0

    def reply(self) -> str | None:
        """Stream the model's answer to stdout; None if it could not be produced."""
        import dataclasses

        engine = self.engine
        tokenizer = engine.tokenizer
        prompt = tokenizer.encode(tokenizer.apply_chat_template(self.messages, True), add_special_tokens=False)
        room = engine.max_model_len - len(prompt)
        if room < 1:
            print(f"(the conversation is too long for the context of {engine.max_model_len} tokens; /reset)",
                  file=sys.stderr, flush=True)
            return None
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens, room))
        request_id = f"chat-{self.turn}"
        self.turn += 1
        try:
            engine.add_request(request_id, prompt, params)
        except ValueError as e:
            print(f"(error: {e})", file=sys.stderr, flush=True)
            return None
        shown = 0
        text = ""
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.request_id == request_id:
                        text = output.outputs[0].text
                        sys.stdout.write(text[shown:])
                        sys.stdout.flush()
                        shown = len(text)
        except KeyboardInterrupt:
            engine.abort_request(request_id)
            print(" (interrupted)", flush=True)
            return text
        print(flush=True)
        return text
