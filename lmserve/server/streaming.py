"""Server-sent events, text deltas that never show part of a stop string, and watching for clients that leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from lmserve.engine.detokenizer import partial_stop_suffix
from lmserve.engine.request_stream import RequestStream
from lmserve.outputs import RequestOutput

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """An event stream that calls `on_close` however it ends: finished, client gone, cancelled, or cancelled before
    the generator ever started (when the generator's own cleanup would not run)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class TextDelta:
    """What to send next of one choice's cumulative text, holding back a tail that may begin a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.sent = 0

    def next(self, text: str, finished: bool) -> str:
        end = len(text) if finished or not self.stops else len(text) - partial_stop_suffix(text, self.stops)
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index of the stream, output) from several streams as they come."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(streams))
    finished = object()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, e))
        await queue.put((index, finished))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work`, or raise ClientDisconnected (cancelling it) as soon as the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
