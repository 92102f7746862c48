"""Request life cycle on the engine: aborts free every block, the prefix cache counts hits without changing
outputs, n > 1 shares the prompt's blocks, seeds survive batch composition, stop strings, bad input."""

from __future__ import annotations

import random

import pytest
from engine_helpers import assert_all_blocks_free, mixed_prompts
from tiny_models import LLAMA_GQA_TIED, make_tiny_model

from lmserve.llm import LLM
from lmserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_tiny_model(LLAMA_GQA_TIED, directory)
    return directory


@pytest.fixture
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", block_size=4, max_num_batched_tokens=32, num_kv_blocks=200)


def test_aborts_at_random_points_free_every_block(llm):
    rng = random.Random(1)
    engine = llm.engine
    params = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True, n=2)
    for i, prompt in enumerate(mixed_prompts(12)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    live = {f"r{i}" for i in range(12)}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                live.discard(output.request_id)
        for request_id in list(live):
            if rng.random() < 0.1:
                assert engine.abort_request(request_id)
                live.discard(request_id)
    assert not engine.abort_request("r0")
    assert_all_blocks_free(llm)


def test_prefix_cache_hits_rise_and_never_change_outputs(model_dir, llm):
    shared = list(range(10, 60))
    prompts = [{"prompt_token_ids": shared + [i, i + 1]} for i in range(100, 106)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    before = llm.engine.stats().prefix_cache_hits
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits - before >= 5 * 48  # 12 full blocks of 4 shared by each later prompt
    assert stats.kv_blocks_cached_free > 0
    assert all(o.metrics.num_cached_tokens == 48 for o in rest)
    uncached = LLM(str(model_dir), dtype="float32", block_size=4, enable_prefix_caching=False, num_kv_blocks=200)
    expected = uncached.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == [o.outputs[0].token_ids for o in expected]
    assert uncached.engine.stats().prefix_cache_hits == 0
    assert_all_blocks_free(llm)


def test_n_completions_share_the_prompt_blocks(llm):
    engine = llm.engine
    prompt = list(range(20, 60))  # 40 tokens = 10 blocks of 4
    engine.add_request("n4", {"prompt_token_ids": prompt}, SamplingParams(n=4, temperature=1.0, max_tokens=6,
                                                                         ignore_eos=True, seed=3))
    peak, final = 0, None
    while engine.has_unfinished_requests():
        for output in engine.step():
            final = output
        peak = max(peak, engine.stats().kv_blocks_used)
    assert len(final.outputs) == 4 and all(len(o.token_ids) == 6 for o in final.outputs)
    assert len({tuple(o.token_ids) for o in final.outputs}) > 1
    # prompt stored once (9 shared full blocks + the leader's last) plus each completion's own tail blocks
    assert peak <= 10 + 4 * 2
    assert_all_blocks_free(llm)


def test_seeded_sampling_ignores_batch_composition(model_dir):
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = LLM(str(model_dir), dtype="float32").generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in mixed_prompts(8, seed=5)]
    noisy = SamplingParams(temperature=1.2, max_tokens=16, ignore_eos=True)
    batch = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=16).generate(
        others[:4] + [prompt] + others[4:], [noisy] * 4 + [seeded] + [noisy] * (len(others) - 4),
        use_tqdm=False)
    assert batch[4].outputs[0].token_ids == alone


def test_stop_string_split_across_tokens(model_dir, llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate(["The quick brown"], greedy, use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the last character of one token's text and the first of the next one's
    candidates = [(i, pieces[i][-1] + pieces[i + 1][0]) for i in range(len(pieces) - 1) if pieces[i] and pieces[i + 1]]
    i, stop = next((i, stop) for i, stop in candidates if stop not in "".join(pieces[:i]) + pieces[i][:-1])
    assert full.text.index(stop) == len("".join(pieces[:i + 1])) - 1
    out = llm.generate(["The quick brown"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                           stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    kept = llm.generate(["The quick brown"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                                            include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == full.text[: full.text.index(stop) + len(stop)]
    assert_all_blocks_free(llm)


def test_stop_token_ids_and_eos(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = llm.generate([[5, 6, 7]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stopped = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tokens[3]]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == tokens[: tokens.index(tokens[3]) + 1] and stopped.stop_reason == tokens[3]
    biased = SamplingParams(temperature=0, max_tokens=12, logit_bias={2: 100.0}, min_tokens=3)
    out = llm.generate([[5, 6, 7]], biased, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[-1] == 2 and len(out.token_ids) == 4 and out.finish_reason == "stop"


def test_logprobs_and_prompt_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 4
    for position in range(1, 4):
        entry = out.prompt_logprobs[position]
        assert out.prompt_token_ids[position] in entry and len(entry) <= 3
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for token, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert sorted(lp.rank for lp in entry.values()) == [1, 2, 3]
    chosen = [e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True)]
    assert completion.cumulative_logprob == pytest.approx(sum(chosen))


def test_echo_only_prompt_logprobs_with_zero_max_tokens(llm):
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, 4))
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("prompt,params,match", [
    ([5, 6], dict(temperature=-1.0), "temperature"),
    ([5, 6], dict(temperature=1e9), "temperature"),
    ([5, 6], dict(top_p=0.0), "top_p"),
    ([5, 6], dict(top_p=1.5), "top_p"),
    ([5, 6], dict(n=10_000), "n"),
    ([5, 6], dict(max_tokens=300), "max_tokens"),
    (list(range(3, 300)), dict(max_tokens=1), "maximum context length"),
    ([], dict(), "empty"),
    ("", dict(), "empty"),
    ([5, 99999], dict(), "outside the vocabulary"),
    ([5, -1], dict(), "outside the vocabulary"),
    ([5, 6], dict(logit_bias={99999: 1.0}), "logit_bias"),
])
def test_bad_input_raises_clear_value_error(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], SamplingParams(**params), use_tqdm=False)
    assert_all_blocks_free(llm)
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_priority_scheduling_runs_urgent_requests_first(model_dir):
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=1, scheduling_policy="priority")
    outputs = llm.generate([[5, 6], [7, 8], [9, 10]], SamplingParams(max_tokens=3, ignore_eos=True),
                           priority=[5, 0, 9], use_tqdm=False)
    order = sorted(range(3), key=lambda i: outputs[i].metrics.first_token_time)
    assert order == [1, 0, 2]


def test_cache_salt_isolates_prefix_cache_entries(llm):
    engine, prompt = llm.engine, {"prompt_token_ids": list(range(10, 50))}
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def run(request_id: str, salt: str | None) -> int:
        engine.add_request(request_id, prompt, params, cache_salt=salt)
        while engine.has_unfinished_requests():
            outputs = engine.step()
        return outputs[0].metrics.num_cached_tokens

    assert run("a", "tenant-1") == 0
    assert run("b", "tenant-2") == 0
    assert run("c", None) == 0
    assert run("d", "tenant-1") == 36  # 9 full blocks of 4, the last prompt token always recomputed


def test_prompts_arriving_while_a_stream_decodes_take_short_steps(model_dir):
    """A burst of prompts while a stream decodes: every step runs the decodes and at most
    max_prefill_tokens_while_decoding prompt tokens, so the stream's next token never waits for a whole budget of
    prefill; a step with no decodes takes the whole budget. Outputs equal those of an unlimited step."""
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8,
              num_kv_blocks=200)
    engine, steps = llm.engine, []
    schedule = engine.scheduler.schedule

    def recorded_schedule():
        batch = schedule()
        steps.append([(seq.is_prefilling, n) for seq, n in zip(batch.seqs, batch.num_tokens, strict=True)])
        return batch

    engine.scheduler.schedule = recorded_schedule
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [list(range(3, 40))] + [list(range(5 + i, 35 + i)) for i in range(4)]
    engine.add_request("first", {"prompt_token_ids": prompts[0]}, params)
    engine.step()
    for i, prompt in enumerate(prompts[1:]):
        engine.add_request(f"burst-{i}", {"prompt_token_ids": prompt}, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}

    assert steps[0] == [(True, 37)]  # nothing decodes yet: the whole prompt at once
    with_decodes = [sum(n for prefilling, n in step if prefilling) for step in steps if (False, 1) in step]
    assert max(with_decodes) == 8 and len(with_decodes) >= 120 // 8
    unlimited = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [outputs["first"], *(outputs[f"burst-{i}"] for i in range(4))] == [o.outputs[0].token_ids
                                                                              for o in unlimited]
    assert_all_blocks_free(llm)
