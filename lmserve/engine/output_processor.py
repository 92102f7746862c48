"""Turns sampled tokens into text, log-prob records and finish decisions, and requests into RequestOutputs."""

from __future__ import annotations

from lmserve.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from lmserve.engine.sequence import Request, Sequence
from lmserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from lmserve.weights.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}

    def position_logprobs(self, token_id: int, logprob: float, rank: int,
                          top: list[tuple[int, float]]) -> PositionLogprobs:
        """The chosen token first, then the top alternatives ranked 1..k."""
        decode = self.tokenizer.backend.id_to_token
        entry = {token_id: Logprob(logprob, rank, decode(token_id))}
        for i, (alt_id, alt_logprob) in enumerate(top):
            entry.setdefault(alt_id, Logprob(alt_logprob, i + 1, decode(alt_id)))
        return entry

    def append_token(self, seq: Sequence, token_id: int, logprobs: PositionLogprobs | None) -> None:
        """Record one sampled token and decide whether the sequence is done."""
        params = seq.params
        seq.output_token_ids.append(token_id)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id].logprob
        detokenizer = self.detokenizers.get(seq.seq_id)
        if detokenizer is None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens)
            self.detokenizers[seq.seq_id] = detokenizer
        new_text = detokenizer.step(token_id)
        seq.text += new_text
        num_out = len(seq.output_token_ids)
        if num_out >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return self._finish(seq, "stop", None)
            if token_id in params.stop_token_ids:
                if not params.include_stop_str_in_output:
                    seq.text = seq.text[: len(seq.text) - len(new_text)]
                return self._finish(seq, "stop", token_id)
            found = find_stop_string(seq.text, len(new_text), params.stop) if params.stop and new_text else None
            if found:
                start, stop = found
                seq.text = seq.text[: start + len(stop) if params.include_stop_str_in_output else start]
                return self._finish(seq, "stop", stop)
        if num_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def add_prompt_logprobs(self, request: Request, first_position: int, entries: list) -> None:
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None] * len(request.prompt_token_ids)
        for offset, (logprob, rank, top) in enumerate(entries):
            position = first_position + offset
            request.prompt_logprobs[position] = self.position_logprobs(
                request.prompt_token_ids[position], logprob, rank, top)

    def make_output(self, request: Request) -> RequestOutput:
        wants_logprobs = request.params.logprobs is not None
        outputs = [CompletionOutput(index=seq.index, text=seq.text, token_ids=list(seq.output_token_ids),
                                    cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
                                    logprobs=list(seq.logprobs) if wants_logprobs else None,
                                    finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
                   for seq in request.seqs]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, request.prompt_logprobs,
                             outputs, request.finished, request.metrics)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish(reason, stop_reason)
        self.detokenizers.pop(seq.seq_id, None)

    def forget(self, seq: Sequence) -> None:
        self.detokenizers.pop(seq.seq_id, None)
