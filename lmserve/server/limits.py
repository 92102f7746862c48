"""Bounded request bodies: Content-Length over the limit is refused before reading, and a body sent without one
(chunked) is counted while it streams in. The app then gets the whole body at once."""

from __future__ import annotations

from lmserve.server.errors import send_error

_CLOSE = [(b"connection", b"close")]


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
                    return await send_error(send, 413, self._too_large(), code="request_too_large", headers=_CLOSE)
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its request; nobody to answer
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await send_error(send, 413, self._too_large(), code="request_too_large", headers=_CLOSE)
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

    def _too_large(self) -> str:
        return f"Request body too large: the limit is {self.max_bytes} bytes (--max-request-bytes)."
