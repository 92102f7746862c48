"""POST /v1/completions: one engine request per prompt, n choices each, streamed or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmserve.engine.request_stream import RequestStream
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams
from lmserve.server.body import parse_body
from lmserve.server.errors import bad_request
from lmserve.server.inputs import encode_prompts, fit_params, normalize_prompts, sampling_params
from lmserve.server.logprobs import CompletionLogprobs, vllm_prompt_logprobs
from lmserve.server.protocol import CompletionRequest, _GenerationRequest
from lmserve.server.state import ServerState
from lmserve.server.streaming import DONE, ClientDisconnected, SSEResponse, TextDelta, merge, sse, unless_disconnected

router = APIRouter()


@dataclass
class _Job:
    """One completions request after validation."""

    id: str
    model: str
    created: int
    req: CompletionRequest
    params: SamplingParams
    prompts: list[str | list[int]]
    prompt_ids: list[list[int]]

    def prompt_text(self, state: ServerState, i: int) -> str:
        prompt = self.prompts[i]
        return prompt if isinstance(prompt, str) else state.ready_engine().tokenizer.decode(prompt)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(ids) for ids in self.prompt_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def check_request(req: _GenerationRequest) -> None:
    """Refusals shared by completions and chat: unsupported fields, stream_options without stream."""
    unsupported = req.unsupported()
    if unsupported:
        name, _, value = unsupported[0].partition("=")
        what = f"{name} {value!r}" if value else name
        raise bad_request(f"{what} is not supported yet by this server.", name, "unsupported")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options can only be set when stream is true.", "stream_options")


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = await parse_body(request, CompletionRequest)
    model = state.check_model(req.model)
    check_request(req)
    engine = state.ready_engine()
    prompts = normalize_prompts(req.prompt)
    k = req.logprobs
    prompt_logprobs = req.prompt_logprobs
    if req.echo and k is not None:
        prompt_logprobs = max(k, prompt_logprobs or 0)
    params = sampling_params(req, req.max_tokens, logprobs=k, prompt_logprobs=prompt_logprobs)
    prompt_ids = await asyncio.to_thread(encode_prompts, engine, prompts, req.add_special_tokens)
    pool = state.pool_tokens()
    fitted = [fit_params(params, len(ids), engine, pool, "prompt", "max_tokens") for ids in prompt_ids]
    job = _Job(state.new_id("cmpl"), model, int(time.time()), req, params, prompts, prompt_ids)
    streams = await state.submit([(f"{job.id}-{i}", {"prompt_token_ids": ids}, p, req.priority, req.cache_salt)
                                  for i, (ids, p) in enumerate(zip(prompt_ids, fitted, strict=True))])
    if req.stream:
        return SSEResponse(_stream(state, job, streams), lambda: _abort(state, streams))
    try:
        outputs = await unless_disconnected(asyncio.gather(*(s.result() for s in streams)), request)
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening; the finally below has freed the blocks
    finally:
        _abort(state, streams)
    return JSONResponse(_response(state, job, outputs))


def _abort(state: ServerState, streams: list[RequestStream]) -> None:
    """Abort the job's requests (a no-op for those that finished): the client has what it will get."""
    for stream in streams:
        if not stream.finished:
            state.engine.abort(stream.request_id)


def _choice_logprobs(state: ServerState, job: _Job, output: RequestOutput, choice: CompletionOutput) -> dict | None:
    if job.req.logprobs is None:
        return None
    builder = CompletionLogprobs(state.token_text(), job.req.logprobs)
    ids, positions = list(choice.token_ids), list(choice.logprobs or [])
    if job.req.echo:
        ids = output.prompt_token_ids + ids
        positions = (output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + positions
    return builder.build(ids, positions)


def _response(state: ServerState, job: _Job, outputs: list[RequestOutput]) -> dict:
    choices = []
    completion_tokens = 0
    for i, output in enumerate(outputs):
        prompt_text = job.prompt_text(state, i) if job.req.echo else ""
        for choice in output.outputs:
            completion_tokens += len(choice.token_ids)
            entry = {"index": i * job.params.n + choice.index, "text": prompt_text + choice.text,
                     "logprobs": _choice_logprobs(state, job, output, choice),
                     "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
            if job.req.prompt_logprobs is not None:
                entry["prompt_logprobs"] = vllm_prompt_logprobs(output.prompt_logprobs)
            choices.append(entry)
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": job.usage(completion_tokens)}


class _ChoiceState:
    def __init__(self, state: ServerState, job: _Job) -> None:
        self.delta = TextDelta(job.params.stop)
        self.logprobs = CompletionLogprobs(state.token_text(), job.req.logprobs) if job.req.logprobs is not None \
            else None
        self.started = False
        self.sent_tokens = 0
        self.done = False


async def _stream(state: ServerState, job: _Job, streams: list[RequestStream]) -> AsyncIterator[bytes]:
    n = job.params.n
    choices = {i * n + j: _ChoiceState(state, job) for i in range(len(streams)) for j in range(n)}
    completion_tokens = 0
    try:
        async for i, output in merge(streams):
            updates = []
            for choice in output.outputs:
                index = i * n + choice.index
                cs = choices[index]
                finished = choice.finish_reason is not None
                if cs.done or not (choice.token_ids or finished):
                    continue  # still prefilling
                text = cs.delta.next(choice.text, finished)
                ids, positions = choice.token_ids[cs.sent_tokens:], (choice.logprobs or [])[cs.sent_tokens:]
                cs.sent_tokens = len(choice.token_ids)
                if not cs.started:
                    cs.started = True
                    if job.req.echo:
                        text = job.prompt_text(state, i) + text
                        ids = output.prompt_token_ids + ids
                        positions = (output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + positions
                logprobs = cs.logprobs.build(ids, positions) if cs.logprobs is not None and ids else None
                if not text and logprobs is None and not finished:
                    continue
                if finished:
                    cs.done = True
                    completion_tokens += len(choice.token_ids)
                updates.append({"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason if finished else None,
                                "stop_reason": choice.stop_reason if finished else None})
            if updates:
                yield sse({"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                           "choices": updates})
        options = job.req.stream_options
        if options is not None and options.include_usage:
            yield sse({"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                       "choices": [], "usage": job.usage(completion_tokens)})
    except Exception as e:  # noqa: BLE001 - the status line is sent; report the failure in the stream
        yield sse({"error": {"message": str(e)[:500], "type": "server_error", "param": None,
                             "code": "engine_error"}})
    finally:
        _abort(state, streams)
    yield DONE
