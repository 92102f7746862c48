"""What every route needs: the async engine, the names the model is served under, the API limits."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.llm_engine import LLMEngine, PromptInput
from lmserve.engine.request_stream import EngineDeadError, EngineNotReadyError, QueueFullError, RequestStream
from lmserve.sampling_params import SamplingParams
from lmserve.server.errors import APIError, from_value_error
from lmserve.server.logprobs import TokenText
from lmserve.server.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: AsyncEngine
    served_model_names: list[str]
    metrics: ServerMetrics
    created: int = 0
    _token_text: TokenText | None = None

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def ready_engine(self) -> LLMEngine:
        """The loaded LLMEngine, for read-only facts (tokenizer, limits); 503 while loading or after a failure."""
        if self.engine.dead:
            raise APIError(503, f"The engine is not available: {self.engine.death_message()}",
                           code="engine_dead")
        if not self.engine.ready:
            raise APIError(503, "The model is still loading; retry shortly.", code="model_loading",
                           headers={"retry-after": "5"})
        return self.engine.engine

    def check_model(self, name: str | None) -> str:
        """The model name to answer with; 404 for a name this server does not serve."""
        if name is None or name == "":
            return self.model_name
        if name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return name

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.ready_engine().tokenizer)
        return self._token_text

    async def submit(self, requests: list[tuple[str, PromptInput, SamplingParams, int, str | None]]
                     ) -> list[RequestStream]:
        """Queue requests all-or-nothing and wait until the engine has accepted every one of them."""
        try:
            streams = self.engine.add_requests(requests)
        except (QueueFullError, EngineDeadError, EngineNotReadyError) as e:
            raise admission_error(e) from None
        try:
            for stream in streams:
                await stream.accepted()
        except BaseException as e:
            for stream in streams:
                self.engine.abort(stream.request_id)
            if isinstance(e, ValueError):
                raise from_value_error(e) from None
            if isinstance(e, EngineDeadError):
                raise admission_error(e) from None
            raise
        return streams

    def pool_tokens(self) -> int:
        """How many tokens the KV pool holds: one request can never use more."""
        engine = self.ready_engine()
        return engine.block_manager.num_blocks * engine.config.block_size


def admission_error(error: Exception) -> APIError:
    """EngineDeadError / EngineNotReadyError / QueueFullError as 503s."""
    if isinstance(error, QueueFullError):
        return APIError(503, str(error), code="queue_full", headers={"retry-after": "1"})
    if isinstance(error, EngineNotReadyError):
        return APIError(503, "The model is still loading; retry shortly.", code="model_loading",
                        headers={"retry-after": "5"})
    if isinstance(error, EngineDeadError):
        return APIError(503, f"The engine is not available: {error}", code="engine_dead")
    raise error
