"""From a validated request to engine inputs: prompts as token ids, SamplingParams, max_tokens that fit."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmserve.engine.llm_engine import LLMEngine
from lmserve.sampling_params import SamplingParams
from lmserve.server.errors import APIError, bad_request, from_value_error
from lmserve.server.protocol import ChatMessage, _GenerationRequest

MAX_PROMPTS = 256  # prompts in one /v1/completions batch


def sampling_params(req: _GenerationRequest, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams for the request (unset fields keep SamplingParams' defaults); 400 naming a bad field."""
    fields: dict[str, Any] = dict(n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, logit_bias=req.logit_bias,
                                  seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                                  ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output,
                                  skip_special_tokens=req.skip_special_tokens, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise from_value_error(e) from None


def context_error(limit: int, prompt_len: int, completion: int, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{prompt_len + completion} tokens ({prompt_len} in the messages, {completion} in the "
                         f"completion). Please reduce the length of the messages or completion.",
                    param=param, code="context_length_exceeded")


def fit_params(params: SamplingParams, prompt_len: int, engine: LLMEngine, pool_tokens: int,
               prompt_param: str, max_tokens_param: str) -> SamplingParams:
    """params with max_tokens checked against the context (or, when not given, set to what fits)."""
    limit = engine.max_model_len
    requested = params.max_tokens
    if prompt_len > limit or (prompt_len == limit and requested != 0):
        raise context_error(limit, prompt_len, 1 if requested is None else requested, prompt_param)
    if requested is None:
        room = min(limit, pool_tokens) - prompt_len
        if room < 1:
            raise context_error(min(limit, pool_tokens), prompt_len, 1, prompt_param)
        try:
            return dataclasses.replace(params, max_tokens=room)
        except ValueError as e:  # min_tokens above what fits
            raise from_value_error(e) from None
    if prompt_len + requested > limit:
        raise context_error(limit, prompt_len, requested, max_tokens_param)
    return params


def normalize_prompts(prompt: Any) -> list[str | list[int]]:
    """The completions `prompt` (a string, strings, token ids, or lists of token ids) as a list of prompts."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_token(t) for t in p)
                                                     for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                          "token ids", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
    for p in prompts:
        if len(p) == 0:
            raise bad_request("prompt is empty", "prompt")
    return prompts


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param)


def encode_prompts(engine: LLMEngine, prompts: list[str | list[int]], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each prompt (blocking: run it in a worker thread for long texts)."""
    tokenizer = engine.tokenizer
    encoded = []
    for p in prompts:
        ids = tokenizer.encode(p, add_special_tokens=add_special_tokens) if isinstance(p, str) else p
        if not ids:
            raise bad_request("prompt is empty", "prompt")
        check_token_ids(ids, engine.lm.config.vocab_size, "prompt")
        encoded.append(ids)
    return encoded


def chat_prompt_ids(engine: LLMEngine, messages: list[ChatMessage], add_generation_prompt: bool,
                    continue_final_message: bool, add_special_tokens: bool = False) -> list[int]:
    """The conversation through the model's chat template, as token ids (blocking)."""
    tokenizer = engine.tokenizer
    if continue_final_message and (add_generation_prompt or messages[-1].role != "assistant"):
        raise bad_request("continue_final_message needs add_generation_prompt=false and a final assistant message",
                          "continue_final_message")
    conversation = []
    for message in messages:
        entry = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        if message.name is not None:
            entry["name"] = message.name
        conversation.append(entry)
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt)
    except ValueError as e:
        raise from_value_error(e, "messages") from None
    if continue_final_message:
        final = conversation[-1]["content"]
        cut = text.rfind(final) if final else -1
        if cut == -1:
            raise bad_request("continue_final_message: the chat template does not keep the final message verbatim",
                              "continue_final_message")
        text = text[: cut + len(final)]
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise bad_request("messages: the conversation renders to an empty prompt", "messages")
    return ids
