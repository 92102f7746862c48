"""Bounded request bodies: Content-Length over the limit is refused without buffering, and a body sent without one
(chunked) is counted while it streams in. The app then gets the whole body at once.

A refused body is still read and dropped, up to DRAIN_FACTOR times the limit, before the 413 goes out: closing a
socket with unread data makes the kernel reset the connection, and that reset can reach the client before the
answer does."""

from __future__ import annotations

from lmserve.server.errors import send_error

_CLOSE = [(b"connection", b"close")]
DRAIN_FACTOR = 4


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    return await send_error(send, 400, "invalid Content-Length header", headers=_CLOSE)
                if int(value) > self.max_bytes:
                    return await self._refuse(receive, send)
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its request; nobody to answer
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await self._refuse(receive, send, more=message.get("more_body", False))
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, receive, send, more: bool = True) -> None:
        budget = DRAIN_FACTOR * self.max_bytes
        while more and budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                break
            budget -= len(message.get("body", b""))
            more = message.get("more_body", False)
        error = f"Request body too large: the limit is {self.max_bytes} bytes (--max-request-bytes)."
        await send_error(send, 413, error, code="request_too_large", headers=_CLOSE)
