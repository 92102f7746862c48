"""POST /tokenize and /detokenize, in vLLM's shapes."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from lmserve.server.body import parse_body
from lmserve.server.inputs import chat_prompt_ids, check_token_ids
from lmserve.server.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from lmserve.server.state import ServerState

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    try:
        has_messages = "messages" in json.loads(await request.body())
    except (ValueError, TypeError, RecursionError):
        has_messages = False  # parse_body reports what is wrong
    req = await parse_body(request, TokenizeChatRequest if has_messages else TokenizeCompletionRequest)
    state.check_model(req.model)
    engine = state.ready_engine()
    if isinstance(req, TokenizeChatRequest):
        ids = await asyncio.to_thread(chat_prompt_ids, engine, req.messages, req.add_generation_prompt,
                                      req.continue_final_message, req.add_special_tokens)
    else:
        ids = await asyncio.to_thread(engine.tokenizer.encode, req.prompt, req.add_special_tokens)
    token_strs = [engine.tokenizer.backend.id_to_token(i) for i in ids] if req.return_token_strs else None
    return JSONResponse({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                         "token_strs": token_strs})


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    req = await parse_body(request, DetokenizeRequest)
    state.check_model(req.model)
    engine = state.ready_engine()
    check_token_ids(req.tokens, engine.tokenizer.vocab_size, "tokens")
    text = await asyncio.to_thread(engine.tokenizer.decode, req.tokens)
    return JSONResponse({"prompt": text})
