"""The batched sampler on hand-made logits: each stage does exactly its job, per row, whatever shares the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from lmserve.runner.sampler import Sampler, SamplerOutput, apply_penalties, prompt_logprobs, truncate
from lmserve.runner.sampling_batch import SamplingBatch
from lmserve.sampling_params import SamplingParams

EOS = 7


@dataclass
class Row:
    params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=lambda: [0])
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def batch_of(rows: list[Row], vocab_size: int) -> SamplingBatch:
    return SamplingBatch.build(rows, vocab_size, {EOS}, "cpu")


def sample(rows: list[Row], logits: torch.Tensor) -> SamplerOutput:
    return Sampler()(logits, batch_of(rows, logits.shape[-1]))


def draws(params: SamplingParams, logits_row: list[float], n: int = 2000, calls: int = 2) -> list[int]:
    """Tokens from `n` identical rows in one batch, over several calls."""
    logits = torch.tensor([logits_row]).expand(n, -1)
    return [t for _ in range(calls) for t in sample([Row(params) for _ in range(n)], logits).token_ids]


def frequencies(tokens: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab_size).float() / len(tokens)


def test_greedy_is_argmax_of_processed_logits():
    logits = torch.randn(16, 50)
    out = sample([Row(SamplingParams(temperature=t)) for t in [0.0, 1e-6] * 8], logits)
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs is None


def test_all_greedy_batch_consumes_no_randomness():
    row = Row(SamplingParams(temperature=0, seed=5))
    state = row.generator.get_state()
    sample([row], torch.randn(1, 10))
    assert torch.equal(row.generator.get_state(), state)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_matches_softmax(temperature):
    logits = [1.0, 0.5, 0.0, -1.0, 2.0]
    expected = torch.tensor(logits).div(temperature).softmax(-1)
    observed = frequencies(draws(SamplingParams(temperature=temperature), logits), 5)
    assert torch.allclose(observed, expected, atol=0.03)


PROBS = [0.5, 0.25, 0.15, 0.1]


def kept(params: SamplingParams, probs: list[float] = PROBS) -> set[int]:
    """Tokens that survive truncation for one row."""
    logits = torch.tensor([probs]).log()
    return set(torch.isfinite(truncate(logits, batch_of([Row(params)], len(probs))))[0].nonzero().flatten().tolist())


@pytest.mark.parametrize("top_p, expected", [(0.45, {0}), (0.55, {0, 1}), (0.7, {0, 1}), (0.8, {0, 1, 2}),
                                             (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    assert kept(SamplingParams(top_p=top_p)) == expected


def reference_kept(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Mask of the tokens top-k, then top-p renormalised over the top k, then min-p keep: the obvious way, per row."""
    order = logits.argsort(descending=True)[:p.top_k or None]
    probs = logits[order].softmax(-1)
    nucleus = int((probs.cumsum(-1) < p.top_p).sum()) + 1 if p.top_p < 1 else len(order)
    keep = order[:nucleus][probs[:nucleus] >= p.min_p * probs[0]]
    return torch.zeros_like(logits, dtype=torch.bool).index_fill_(0, keep, True)


@pytest.mark.parametrize("vocab_size", [3000, 20000])
def test_truncation_matches_reference_including_wide_nuclei(vocab_size):
    """Flatter rows have nuclei wider than the top-k windows searched first: the sampler must widen or sort."""
    settings = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.3), SamplingParams(top_k=5, top_p=0.5),
                SamplingParams(min_p=0.05), SamplingParams(top_k=50, min_p=0.2), SamplingParams(),
                SamplingParams(top_k=1500, top_p=0.8), SamplingParams(temperature=0)]
    for scale in (0.05, 1.0, 5.0):
        logits = torch.randn(len(settings), vocab_size) * scale
        got = truncate(logits, batch_of([Row(p) for p in settings], vocab_size))
        for row, p in enumerate(settings):
            expected = torch.ones(vocab_size, dtype=torch.bool) if p.greedy else reference_kept(logits[row], p)
            assert torch.equal(got[row].isfinite(), expected)


@pytest.mark.parametrize("params", [SamplingParams(top_k=3), SamplingParams(top_p=0.7),
                                    SamplingParams(top_k=4, top_p=0.8, temperature=0.8)])
def test_truncated_sampling_matches_renormalised_softmax(params):
    logits = torch.tensor([1.5, 1.0, 0.0, -1.0, 2.0])
    probs = (logits / params.temperature).softmax(-1)
    probs[~reference_kept(logits / params.temperature, params)] = 0
    observed = frequencies(draws(params, logits.tolist()), 5)
    assert torch.allclose(observed, probs / probs.sum(), atol=0.03)


def test_top_k_then_top_p_renormalises():
    probs = [0.4, 0.3, 0.2, 0.1]
    assert kept(SamplingParams(top_p=0.5), probs) == {0, 1}
    assert kept(SamplingParams(top_k=2, top_p=0.5), probs) == {0}  # within the top 2, token 0 has 4/7 >= 0.5


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=3), {4, 0, 1}),
    (SamplingParams(top_k=1), {4}),
    (SamplingParams(top_p=0.6), {4, 0}),
    (SamplingParams(min_p=0.5), {4, 0}),  # exp(1 - 2) = 0.37 < 0.5 <= exp(1.5 - 2)
    (SamplingParams(top_k=3, min_p=0.5, temperature=0.8), {4, 0}),  # exp(-0.5 / 0.8) = 0.54
    (SamplingParams(top_k=100), {0, 1, 2, 3, 4}),  # larger than the vocabulary: off
])
def test_sampling_stays_in_allowed_set(params, allowed):
    tokens = set(draws(params, [1.5, 1.0, 0.0, -1.0, 2.0]))
    assert tokens <= allowed and len(tokens) == len(allowed)


def test_mixed_batch_each_row_follows_its_own_settings():
    settings = [SamplingParams(temperature=0), SamplingParams(top_k=2), SamplingParams(), SamplingParams(min_p=0.9)]
    rows = [Row(settings[i % 4]) for i in range(2000)]
    logits = torch.tensor([[1.5, 1.0, 0.0, -1.0, 2.0]]).expand(2000, -1)
    tokens = torch.tensor(sample(rows, logits).token_ids).view(-1, 4)
    assert set(tokens[:, 0].tolist()) == {4} and set(tokens[:, 1].tolist()) == {4, 0}
    assert set(tokens[:, 2].tolist()) == {0, 1, 2, 3, 4} and set(tokens[:, 3].tolist()) == {4}


def test_penalties_change_logits_exactly():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0, 0.0, 0.0, 0.0]]).repeat(2, 1)
    penalised = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                               logit_bias={5: 1.5, 2: -0.5})
    rows = [Row(penalised, prompt_token_ids=[0, 1], output_token_ids=[2, 2, 0]),
            Row(SamplingParams(), prompt_token_ids=[0, 1, 3], output_token_ids=[2])]  # no settings: untouched
    out = apply_penalties(logits, batch_of(rows, 8))
    expected = [2.0 / 2 - 0.5 - 0.25,  # in prompt and output once: repetition, frequency, presence
                -1.0 * 2,  # prompt only, negative: multiplied
                0.0 / 2 - 2 * 0.5 - 0.25,  # bias first (0.5 - 0.5), then penalties; twice in output
                3.0, 1.0, 1.5, 0.0, 0.0]
    assert torch.allclose(out[0], torch.tensor(expected)) and torch.equal(out[1], logits[1])
    assert logits[0, 0] == 2.0  # raw logits are not modified


def test_logit_bias_forces_and_bans():
    assert set(draws(SamplingParams(logit_bias={"3": 100}), [5.0, 4.0, 0.0, -5.0])) == {3}
    assert 0 not in draws(SamplingParams(logit_bias={0: -100}), [5.0, 4.0, 0.0, -5.0], n=500)


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    forced = {EOS: 100.0, 3: 100.0}
    params = SamplingParams(min_tokens=3, stop_token_ids=[3], logit_bias=forced, temperature=0)
    rows = [Row(params, output_token_ids=[1] * n) for n in range(5)]
    out = sample(rows, torch.zeros(5, 10))
    assert [t in (EOS, 3) for t in out.token_ids] == [False, False, False, True, True]
    ignoring = SamplingParams(min_tokens=2, ignore_eos=True, logit_bias={EOS: 100.0})  # eos still banned (vLLM)
    assert EOS not in draws(ignoring, [0.0] * 10, n=200)


def _seeded_run(params: SamplingParams, others: list[Row], position: int, steps: int = 12) -> list[int]:
    """Tokens of a fresh row with seeded `params` sampled for `steps` steps at `position` among `others`."""
    row = Row(params)
    step_logits = torch.randn(steps, 50, generator=torch.Generator().manual_seed(123))
    tokens = []
    for logits_row in step_logits:
        rows = others[:position] + [row] + others[position:]
        logits = torch.randn(len(rows), 50)
        logits[position] = logits_row
        tokens.append(sample(rows, logits).token_ids[position])
    return tokens


@pytest.mark.parametrize("params", [SamplingParams(seed=42), SamplingParams(seed=3, top_p=0.9, temperature=1.5),
                                    SamplingParams(seed=5, top_k=20, min_p=0.05)])
def test_seeded_row_is_independent_of_batch(params):
    """Whatever shares the batch, including rows that send the step down the whole-vocabulary path or a sort."""
    alone = _seeded_run(params, [], 0)
    assert len(set(alone)) > 1
    mixed = [Row(SamplingParams()), Row(SamplingParams(seed=7, top_k=5)), Row(SamplingParams(temperature=0)),
             Row(SamplingParams(top_p=0.5, min_p=0.1))]
    assert _seeded_run(params, mixed, 2) == alone
    assert _seeded_run(params, mixed * 20, 37) == alone
    assert _seeded_run(params, mixed[:1], 1) == alone
    assert _seeded_run(params, [Row(SamplingParams(top_k=2)), Row(SamplingParams(top_p=0.999))], 1) == alone


def test_same_seed_same_token_different_seeds_differ():
    logits = torch.randn(1, 1000).expand(2, -1)
    for _ in range(5):
        a, b = sample([Row(SamplingParams(seed=9)), Row(SamplingParams(seed=9))], logits).token_ids
        assert a == b
    tokens = [sample([Row(SamplingParams(seed=s))], logits[:1]).token_ids[0] for s in range(50)]
    assert len(set(tokens)) > 10


def test_seed_without_generator_is_an_error():
    row = Row(SamplingParams(seed=1))
    row.generator = None
    with pytest.raises(ValueError, match="generator"):
        batch_of([row], 10)


def test_logprobs_of_raw_logits_with_ranks_and_top_k():
    logits = torch.randn(3, 30)
    rows = [Row(SamplingParams(logprobs=5, temperature=0, logit_bias={4: 100})),  # forced token, low raw rank
            Row(SamplingParams(logprobs=0)), Row(SamplingParams())]
    out = sample(rows, logits)
    reference = logits.log_softmax(-1)
    assert out.token_ids[0] == 4
    for i, token in enumerate(out.token_ids):
        assert math.isclose(out.logprobs[i], reference[i, token].item(), rel_tol=1e-5)
        assert out.ranks[i] == int((reference[i] > reference[i, token]).sum()) + 1
    top_ids = reference[0].argsort(descending=True)[:5].tolist()
    assert [t for t, _ in out.top_logprobs[0]] == top_ids
    assert [lp for _, lp in out.top_logprobs[0]] == sorted((lp for _, lp in out.top_logprobs[0]), reverse=True)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


def test_prompt_logprobs():
    logits = torch.randn(6, 40)
    next_ids = torch.tensor([3, 0, 39, 7, 7, 1])
    reference = logits.log_softmax(-1)
    result = prompt_logprobs(logits, next_ids, 3)
    for pos, (logprob, rank, top) in enumerate(result):
        token = next_ids[pos].item()
        assert math.isclose(logprob, reference[pos, token].item(), rel_tol=1e-5)
        assert rank == int((reference[pos] > reference[pos, token]).sum()) + 1
        assert [t for t, _ in top] == reference[pos].argsort(descending=True)[:3].tolist()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.randn(3, 10), batch_of([Row(SamplingParams())], 10))
    with pytest.raises(ValueError, match="tokens"):
        Sampler()(torch.randn(1, 12), batch_of([Row(SamplingParams())], 10))
