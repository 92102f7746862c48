"""Runs one scheduled step: flattens the batch, runs the model once, keeps only the logits it needs, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmserve.engine.scheduler import ScheduledBatch
from lmserve.engine.sequence import Sequence
from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.loader import LoadedModel
from lmserve.runner.sampler import Sampler, SamplerOutput, prompt_logprobs
from lmserve.runner.sampling_batch import SamplingBatch


@dataclass
class PromptLogprobChunk:
    """Log-probs of prompt tokens first_position .. first_position + len(entries) - 1 of one sequence."""

    first_position: int
    entries: list


@dataclass
class StepOutput:
    sampled_seqs: list[Sequence] = field(default_factory=list)
    sampled: SamplerOutput | None = None
    prompt_logprobs: dict[int, PromptLogprobChunk] = field(default_factory=dict)  # by seq_id


class ModelRunner:
    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, kv_dtype: torch.dtype) -> None:
        c = lm.config
        self.lm = lm
        self.block_size = block_size
        self.kv_cache = KVCache.allocate(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim,
                                         kv_dtype, lm.device)
        self.sampler = Sampler()
        # Padded embeddings (Pythia) have rows past the tokenizer's ids: never valid output.
        self.valid_vocab = min(c.vocab_size, lm.tokenizer.vocab_size)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        ids, context_lens, sample_rows, out = [], [], [], StepOutput()
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # seq, first flat row, count, first position
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            start, row = seq.num_computed_tokens, len(ids)
            ids.extend(seq.all_token_ids[start: start + n])
            context_lens.append(start + n)
            if seq.wants_prompt_logprobs and start < len(seq.prompt_token_ids) - 1:
                prompt_rows.append((seq, row, min(n, len(seq.prompt_token_ids) - 1 - start), start))
            if start + n == seq.num_tokens and len(seq.output_token_ids) < seq.max_tokens:
                sample_rows.append(row + n - 1)
                out.sampled_seqs.append(seq)
        meta = AttentionMetadata.build(batch.num_tokens, context_lens, [s.block_table for s in batch.seqs],
                                       self.block_size, self.lm.device)
        hidden = self.lm.model(torch.tensor(ids, device=self.lm.device), meta, self.kv_cache)
        if out.sampled_seqs:
            logits = self._logits(hidden[torch.tensor(sample_rows, device=self.lm.device)])
            sampling = SamplingBatch.build(out.sampled_seqs, self.lm.config.vocab_size, self.lm.eos_token_ids,
                                          self.lm.device)
            out.sampled = self.sampler(logits, sampling)
        for seq, row, count, position in prompt_rows:
            logits = self._logits(hidden[row: row + count])
            targets = torch.tensor(seq.prompt_token_ids[position + 1: position + 1 + count], device=self.lm.device)
            entries = prompt_logprobs(logits, targets, seq.params.prompt_logprobs)
            out.prompt_logprobs[seq.seq_id] = PromptLogprobChunk(position + 1, entries)
        return out

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.model.compute_logits(hidden)
        if self.valid_vocab < logits.shape[-1]:
            logits[:, self.valid_vocab:] = float("-inf")
        return logits
