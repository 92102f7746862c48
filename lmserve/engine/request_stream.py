"""A request's outputs as the event loop sees them, and the errors that can end a stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from lmserve.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The step loop has stopped (a failure, or shutdown); no request can be served."""


class RequestAbortedError(RuntimeError):
    """The request was aborted (its stream ends with this error)."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class QueueFullError(RuntimeError):
    """Admitting the request would exceed max_waiting_requests."""


class OutputObserver(Protocol):
    """Sees every step's outputs, in the step thread (the server's latency metrics)."""

    def observe(self, outputs: list[RequestOutput], now: float) -> None: ...
    def forget(self, request_id: str) -> None: ...


class RequestStream:
    """One request's outputs on the event loop: acceptance (or the reason it was refused), then outputs."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._changed = asyncio.Event()
        self._accepted = False
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self.finished = False

    # Called on the event loop (through call_soon_threadsafe) by the step thread.
    def _accept(self) -> None:
        self._accepted = True
        self._changed.set()

    def _put(self, output: RequestOutput) -> None:
        self._latest = output
        self._changed.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self.finished:
            self._error = error
            self._changed.set()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def accepted(self) -> None:
        """Returns once the engine has queued the request; raises the engine's ValueError if it refused it."""
        while not self._accepted and self._error is None:
            await self._wait()
        if not self._accepted:
            raise self._error

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            while self._latest is None and self._error is None:
                await self._wait()
            if self._latest is not None:
                output, self._latest = self._latest, None
                self.finished = output.finished
                yield output
            else:
                raise self._error

    async def result(self) -> RequestOutput:
        """The final output."""
        final = None
        async for output in self:
            final = output
        return final
