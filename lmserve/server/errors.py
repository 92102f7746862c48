"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, small whatever the input was.

Messages are cut to a bounded length so that an error never echoes a large request back.
"""

from __future__ import annotations

import dataclasses
import json
import re

from pydantic import ValidationError
from starlette.responses import Response

from lmserve.sampling_params import SamplingParams

MAX_MESSAGE_CHARS = 500
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                   405: "invalid_request_error", 413: "invalid_request_error"}
# Union members pydantic puts into error locations; they are not request fields.
_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|.*\[.*|[A-Z].*)$")
_KNOWN_PARAMS = {f.name for f in dataclasses.fields(SamplingParams)} | {
    "prompt", "prompt_token_ids", "messages", "logit_bias keys", "logit_bias values", "max_completion_tokens"}
_PARAM_ALIASES = {"prompt_token_ids": "prompt", "logit_bias keys": "logit_bias", "logit_bias values": "logit_bias"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "... (truncated)"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    error_type = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": shorten(message), "type": error_type,
                                 "param": shorten(param, 100) if param else None, "code": code}}).encode()


def error_response(error: APIError) -> Response:
    return Response(error_body(error.status, error.message, error.param, error.code), status_code=error.status,
                    headers=error.headers, media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_value_error(error: ValueError, default_param: str | None = None) -> APIError:
    """A 400 for SamplingParams' / the engine's ValueError, naming the parameter its message starts with."""
    message = str(error)
    match = re.match(r"^([A-Za-z_]+(?: keys| values)?)\b", message)
    param = default_param
    if match and match.group(1) in _KNOWN_PARAMS:
        param = _PARAM_ALIASES.get(match.group(1), match.group(1))
    return bad_request(message, param)


def from_validation_error(error: ValidationError, prefix: tuple = ()) -> APIError:
    """A 400 for the first pydantic error: unknown fields are named as OpenAI does, never with their values."""
    first = error.errors(include_url=False, include_input=False)[0]
    loc = [*prefix, *first["loc"]]
    parts = [str(p) for p in loc if isinstance(p, int) or not _TYPE_TAGS.match(str(p))]
    param = ".".join(parts) or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    if first["type"] == "missing":
        return bad_request(f"{param}: this field is required", param)
    return bad_request(f"{param}: {first['msg']}" if param else first["msg"], param)


async def send_error(send, status: int, message: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer with an OpenAI-shaped error straight through ASGI (for middleware that never reaches the app)."""
    body = error_body(status, message, None, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
