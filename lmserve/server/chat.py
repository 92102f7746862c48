"""POST /v1/chat/completions: the conversation through the chat template, n choices, streamed or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmserve.engine.request_stream import RequestStream
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import MAX_LOGPROBS, SamplingParams
from lmserve.server.body import parse_body
from lmserve.server.completions import check_request
from lmserve.server.errors import bad_request
from lmserve.server.inputs import chat_prompt_ids, fit_params, sampling_params
from lmserve.server.logprobs import chat_logprobs
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.state import ServerState
from lmserve.server.streaming import DONE, ClientDisconnected, SSEResponse, TextDelta, sse, unless_disconnected

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = await parse_body(request, ChatCompletionRequest)
    model = state.check_model(req.model)
    check_request(req)
    engine = state.ready_engine()
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs to be true.", "top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens, max_param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
    params = sampling_params(req, max_tokens, logprobs=logprobs)
    prompt_ids = await asyncio.to_thread(chat_prompt_ids, engine, req.messages, req.add_generation_prompt,
                                         req.continue_final_message)
    params = fit_params(params, len(prompt_ids), engine, state.pool_tokens(), "messages", max_param)
    request_id = state.new_id("chatcmpl")
    (stream,) = await state.submit([(request_id, {"prompt_token_ids": prompt_ids}, params, req.priority,
                                     req.cache_salt)])
    created = int(time.time())
    if req.stream:
        return SSEResponse(_stream(state, req, params, model, created, stream), lambda: _abort(state, stream))
    try:
        output = await unless_disconnected(stream.result(), request)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        _abort(state, stream)
    return JSONResponse(_response(state, req, model, created, output))


def _logprobs(state: ServerState, req: ChatCompletionRequest, choice: CompletionOutput, start: int = 0) -> dict | None:
    if not req.logprobs:
        return None
    return chat_logprobs(state.token_text(), choice.token_ids[start:], (choice.logprobs or [])[start:],
                         req.top_logprobs or 0)


def _usage(output: RequestOutput, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _response(state: ServerState, req: ChatCompletionRequest, model: str, created: int,
              output: RequestOutput) -> dict:
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _logprobs(state, req, c), "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason} for c in output.outputs]
    return {"id": output.request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": _usage(output, sum(len(c.token_ids) for c in output.outputs))}


async def _stream(state: ServerState, req: ChatCompletionRequest, params: SamplingParams, model: str, created: int,
                  stream: RequestStream) -> AsyncIterator[bytes]:
    head = {"id": stream.request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    deltas = [TextDelta(params.stop) for _ in range(params.n)]
    sent_tokens = [0] * params.n
    done = [False] * params.n
    last: RequestOutput | None = None
    try:
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None} for i in range(params.n)]})
        async for last in stream:
            updates = []
            for choice in last.outputs:
                i = choice.index
                finished = choice.finish_reason is not None
                if done[i]:
                    continue
                text = deltas[i].next(choice.text, finished)
                logprobs = _logprobs(state, req, choice, sent_tokens[i]) \
                    if len(choice.token_ids) > sent_tokens[i] else None
                sent_tokens[i] = len(choice.token_ids)
                if finished:
                    done[i] = True
                    updates.append({"index": i, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                                    "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
                elif text or logprobs is not None:
                    updates.append({"index": i, "delta": {"content": text}, "logprobs": logprobs,
                                    "finish_reason": None})
            if updates:
                yield sse({**head, "choices": updates})
        options = req.stream_options
        if options is not None and options.include_usage and last is not None:
            yield sse({**head, "choices": [], "usage": _usage(last, sum(len(c.token_ids) for c in last.outputs))})
    except Exception as e:  # noqa: BLE001 - the status line is sent; report the failure in the stream
        yield sse({"error": {"message": str(e)[:500], "type": "server_error", "param": None,
                             "code": "engine_error"}})
    finally:
        _abort(state, stream)
    yield DONE


def _abort(state: ServerState, stream: RequestStream) -> None:
    if not stream.finished:
        state.engine.abort(stream.request_id)
