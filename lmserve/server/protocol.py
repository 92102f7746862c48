"""Request bodies of the OpenAI API (and vLLM's extras), validated strictly.

Unknown fields are refused with OpenAI's own message ("Unrecognized request argument supplied: X"), so a typo never
goes unnoticed. Known fields that lmserve does not support yet (tools, response_format, suffix, ...) are refused by
name in `unsupported()`. A few fields that cannot change the output are accepted and ignored: `user`, `metadata`,
`store`, `service_tier`, `parallel_tool_calls`, `safety_identifier`, `prompt_cache_key`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _GenerationRequest(_Strict):
    """Sampling and streaming fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = 0
    cache_salt: str | None = None
    # Accepted and ignored: they cannot change what is generated.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Known but not supported yet: refused by name when set (see unsupported()).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None

    def unsupported(self) -> list[str]:
        """Names of fields that were set but that lmserve cannot honour yet."""
        names = []
        for name in ("functions", "function_call", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs", "length_penalty"):
            if getattr(self, name) is not None:
                names.append(name)
        if self.tools:  # an empty list asks for nothing
            names.append("tools")
        if self.tool_choice not in (None, "none", "auto") or (self.tool_choice == "auto" and self.tools):
            names.append("tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            names.append("response_format")
        if self.use_beam_search:
            names.append("use_beam_search")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            names.append("stream_options.continuous_usage_stats")
        return names


class CompletionRequest(_GenerationRequest):
    prompt: Any
    echo: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    best_of: int | None = None
    add_special_tokens: bool = True
    suffix: Any = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.suffix:
            names.append("suffix")
        if self.best_of is not None and self.best_of != self.n:
            names.append("best_of")
        return names


class ContentPart(BaseModel):
    """A part of a message's content; only text parts are supported (others are refused by name)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # Tool calling is not supported yet; refused by name.
    tool_calls: Any = None
    tool_call_id: Any = None
    refusal: Any = None

    def unsupported(self, where: str) -> list[str]:
        names = [f"{where}.{name}" for name in ("tool_calls", "tool_call_id", "refusal")
                 if getattr(self, name) is not None]
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.type != "text" or part.text is None:
                names.append(f"{where}.content.{j}.type={part.type[:40]}")
        return names

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        names += [name for name in ("audio", "prediction", "reasoning_effort", "web_search_options")
                  if getattr(self, name) is not None]
        if self.modalities not in (None, ["text"]):
            names.append("modalities")
        for i, message in enumerate(self.messages):
            names += message.unsupported(f"messages.{i}")
        return names


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
