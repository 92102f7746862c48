"""`lmserve serve [MODEL]`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from lmserve.commands.engine_args import add_engine_args, engine_options

DEFAULT_MAX_WAITING_REQUESTS = 256
DEFAULT_MAX_REQUEST_BYTES = 8 << 20


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API")
    add_engine_args(parser, positional_model=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: the LMSERVE_API_KEY environment variable, if set)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the name(s) clients use as `model` (default: the model argument)")
    parser.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                        help="queued requests beyond this get 503 at once")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger request bodies get 413")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="seconds in-flight requests may run after SIGTERM before they are aborted")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def run(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from lmserve.engine.config import EngineConfig
    from lmserve.server import build_app
    from lmserve.weights.resolve import resolve_model_path

    for name in ("max_waiting_requests", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    config = EngineConfig(**engine_options(args))
    resolve_model_path(config.model)  # a wrong name fails here, before the server starts
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("lmserve")
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())

    load_errors: list[BaseException | None] = []
    server: uvicorn.Server | None = None

    def on_load_failure(error: BaseException | None) -> None:
        load_errors.append(error)
        if server is not None:
            server.should_exit = True

    app = build_app(config, args.served_model_name or [args.model], args.api_key or os.environ.get("LMSERVE_API_KEY"),
                    max_waiting_requests=args.max_waiting_requests, max_request_bytes=args.max_request_bytes,
                    on_load_failure=on_load_failure)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"lmserve: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lmserve: listening on http://{shown}:{port}/v1 (model {config.model}; /health turns 200 once it has "
          "loaded)", file=sys.stderr, flush=True)
    engine = app.state.server.engine
    timeout = args.shutdown_timeout

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # In-flight requests get `timeout` seconds to finish; then the engine aborts them, so that their
            # responses end cleanly (an error event in a stream, 503 otherwise) before uvicorn would cancel them.
            asyncio.get_running_loop().call_later(timeout, engine.stop)
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, http="h11", log_level=args.log_level,
                                   timeout_graceful_shutdown=timeout + 5))
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; these handlers make that a clean exit (0).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        sock.close()
    if load_errors:
        print(f"lmserve: error: loading the model failed: {load_errors[0]}", file=sys.stderr)
        return 1
    return 0
