"""The FastAPI app: OpenAI-compatible routes over an AsyncEngine, plus /health, /version, /metrics.

The model loads in the engine's step thread after the app starts, so /health answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import lmserve
from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.config import EngineConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.request_stream import EngineDeadError
from lmserve.server import chat, completions, tokenize
from lmserve.server.auth import APIKeyMiddleware
from lmserve.server.errors import APIError, error_response
from lmserve.server.limits import BodyLimitMiddleware
from lmserve.server.metrics import CONTENT_TYPE, ServerMetrics
from lmserve.server.state import ServerState

logger = logging.getLogger("lmserve.server")

DEFAULT_MAX_WAITING_REQUESTS = 256
DEFAULT_MAX_REQUEST_BYTES = 8 << 20


def build_app(engine_config: EngineConfig | None = None, served_model_name: str | list[str] | None = None,
              api_key: str | None = None, *, engine: LLMEngine | None = None,
              max_waiting_requests: int | None = DEFAULT_MAX_WAITING_REQUESTS,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              on_load_failure: Callable[[BaseException | None], None] | None = None) -> FastAPI:
    """An app serving `engine_config`'s model (loaded when the app starts) or a ready `engine`.

    served_model_name: the name(s) clients use in `model` (default: the model as configured); api_key: required as
    'Authorization: Bearer KEY' on every route but /health; max_waiting_requests: more queued requests get 503;
    max_request_bytes: larger bodies get 413; on_load_failure: called (from the step thread) if loading fails.
    """
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be at least 1, got {max_request_bytes}")
    config = engine_config or (engine.config if engine is not None else EngineConfig())
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [config.model])
    if not names or not all(names):
        raise ValueError("served_model_name must be a non-empty name")
    async_engine = AsyncEngine(None if engine is not None else config, engine, max_waiting_requests)
    metrics = ServerMetrics(names[0], lambda: async_engine.stats)
    async_engine.observer = metrics
    if on_load_failure is not None:
        async_engine.on_dead = lambda error: on_load_failure(error) if async_engine.engine is None else None
    state = ServerState(async_engine, names, metrics, created=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="lmserve", version=lmserve.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenize.router)
    _add_info_routes(app, state)
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        state.ready_engine()  # 503 while loading or after the engine died
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": lmserve.__version__})

    def card(name: str) -> dict:
        engine = state.engine.engine if state.engine.ready else None
        return {"id": name, "object": "model", "created": state.created, "owned_by": "lmserve",
                "root": state.engine.config.model, "parent": None,
                "max_model_len": engine.max_model_len if engine is not None else None}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card(name) for name in state.served_model_names]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        return JSONResponse(card(state.check_model(name)))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        return error_response(error)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, error: EngineDeadError) -> Response:
        return error_response(APIError(503, f"The engine is not available: {error}", code="engine_dead"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        message = {404: f"Not found: {request.url.path[:200]}", 405: "Method not allowed."}.get(
            error.status_code, str(error.detail)[:200])
        return error_response(APIError(error.status_code, message, headers=error.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        return error_response(APIError(400, "Invalid request."))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, "Internal server error.", code="internal_error"))
