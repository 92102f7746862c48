"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, SamplingParams) and .chat(messages)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from lmserve.engine.config import EngineConfig
from lmserve.engine.llm_engine import LLMEngine, PromptInput
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams
from lmserve.weights.tokenizer import Tokenizer

Messages = list[dict[str, Any]]


class LLM:
    """An in-process engine for batches: everything is queued at once and run with continuous batching."""

    def __init__(self, model: str = "smollm2-135m-instruct", **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Outputs in the order of `prompts`; token-id prompts as lists or {"prompt_token_ids": [...]}."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority: got {len(priority)} values for {len(prompts)} prompts")
        request_ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p, priority=priority[i] if priority else 0)
                request_ids.append(request_id)
        except ValueError:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: Messages | Sequence[Messages], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Replies to one conversation or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        prompts = [{"prompt_token_ids": tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt),
                                                         add_special_tokens=False)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while len(finished) < len(request_ids):
                outputs = self.engine.step()
                if not outputs:
                    raise RuntimeError("the scheduler made no progress with requests still queued")
                for output in outputs:
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[r] for r in request_ids]
