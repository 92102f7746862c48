"""API-key check (Authorization: Bearer KEY) for every route but /health, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from lmserve.server.errors import send_error

OPEN_PATHS = frozenset({"/health"})


def _digest(value: bytes) -> bytes:
    # Hashing first makes the comparison independent of the key's length as well as its content.
    return hashlib.sha256(value).digest()


class APIKeyMiddleware:
    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._expected = _digest(api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        authorization = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
                break
        scheme, _, token = authorization.partition(b" ")
        provided = token.strip() if scheme.lower() == b"bearer" else b""
        if not hmac.compare_digest(_digest(provided), self._expected):
            message = "Incorrect API key provided." if provided else "Missing API key: send Authorization: Bearer KEY."
            return await send_error(send, 401, message, code="invalid_api_key",
                                    headers=[(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)
