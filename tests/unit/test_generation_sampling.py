"""Seeded token choice (hand values), the KV-cache loop on a plain HF model, the rollout layout."""

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from rl_toolkit.config_schema import SamplingConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.generation.hf_sampling import (
    DECODING_ATTENTION,
    _kv_cache,
    decoding_attention,
    sample_responses,
)
from rl_toolkit.models.generation.rollout import Responses, rollout_batch
from rl_toolkit.models.generation.sampling import (
    choose_tokens,
    inverse_cdf_sample,
    row_seed,
    sampling_logprobs,
    sampling_uniforms,
)
from tests.unit.policy_testing import PAD_ID, VOCAB_SIZE, save_tiny_llama


def _sampling(**overrides) -> SamplingConfig:
    sampling: SamplingConfig = {
        "backend": "hf",
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": 8,
        "stop_token_ids": [],
    }
    sampling.update(overrides)
    return sampling


def _probs(logits: list[float], **overrides) -> list[float]:
    logprobs = sampling_logprobs(torch.tensor([logits]), _sampling(**overrides))
    return logprobs.exp()[0].tolist()


def _logits(probs: list[float]) -> list[float]:
    return [math.log(p) if p > 0 else -math.inf for p in probs]


# ----- the sampling distribution -----


def test_temperature_divides_the_logits():
    # softmax([0, ln 2] / 0.5) = softmax([0, ln 4]) = [1/5, 4/5]
    assert _probs([0.0, math.log(2.0)], temperature=0.5) == pytest.approx([0.2, 0.8])


def test_top_k_keeps_the_k_most_likely_tokens():
    # logits [1, 3, 2, 0], k = 2: tokens 1 and 2, renormalised: softmax([3, 2])
    expected = [0.0, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 0.0]
    assert _probs([1.0, 3.0, 2.0, 0.0], top_k=2) == pytest.approx(expected)
    assert _probs([1.0, 3.0, 2.0, 0.0], top_k=0) == pytest.approx(_probs([1.0, 3.0, 2.0, 0.0]))


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        # sorted 0.5, 0.25, 0.2, 0.05: the mass before 0.25 is 0.5 < 0.7 (kept), before 0.2 is
        # 0.75 (dropped)
        (0.7, [0.5 / 0.75, 0.0, 0.25 / 0.75, 0.0]),
        (0.5, [1.0, 0.0, 0.0, 0.0]),  # the mass before 0.25 is 0.5, not below 0.5
        (0.1, [1.0, 0.0, 0.0, 0.0]),  # the most likely token always stays
        (0.96, [0.5, 0.2, 0.25, 0.05]),  # the crossing token (0.05 after 0.95) stays
    ],
)
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, expected):
    assert _probs(_logits([0.5, 0.2, 0.25, 0.05]), top_p=top_p) == pytest.approx(expected)


def test_top_k_then_top_p_on_what_is_left():
    # top 3 of [0.4, 0.3, 0.2, 0.1] -> [4/9, 3/9, 2/9]; top_p 0.6: 4/9 < 0.6 keeps 3/9, 7/9 drops
    probs = _probs(_logits([0.4, 0.3, 0.2, 0.1]), top_k=3, top_p=0.6)
    assert probs == pytest.approx([4 / 7, 3 / 7, 0.0, 0.0])


# ----- inverse CDF and the token choice -----


def test_inverse_cdf_picks_the_token_whose_interval_holds_u():
    # cumulative probabilities 0.25, 0.25, 0.5, 1.0: token 1 has none and is never drawn
    logprobs = torch.tensor([_logits([0.25, 0.0, 0.25, 0.5])] * 5)
    uniforms = torch.tensor([0.0, 0.2, 0.26, 0.49, 0.999999])
    assert inverse_cdf_sample(logprobs, uniforms).tolist() == [0, 0, 2, 2, 3]
    # unnormalised log-probs give the same tokens
    assert inverse_cdf_sample(logprobs + 3.0, uniforms).tolist() == [0, 0, 2, 2, 3]
    # the largest uniform below 1 never reaches a trailing token of probability 0
    last = torch.tensor([_logits([0.5, 0.5, 0.0])])
    largest = torch.tensor([1.0 - 2**-53], dtype=torch.float64)  # what torch.rand can draw
    assert inverse_cdf_sample(last, largest).tolist() == [1]


def test_tokens_on_a_grid_of_uniforms_follow_the_sampling_distribution():
    # n evenly spaced uniforms: each token is drawn n * p times, to within one draw.
    num_draws = 4000
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.5, 0.0, 1.0]]).expand(num_draws, -1)
    sampling = _sampling(temperature=0.8, top_k=4, top_p=0.9)
    uniforms = (torch.arange(num_draws, dtype=torch.float64) + 0.5) / num_draws
    tokens, _ = choose_tokens(logits, uniforms, sampling)
    counts = torch.bincount(tokens, minlength=6).double() / num_draws
    expected = sampling_logprobs(logits[:1], sampling).exp()[0].double()
    assert expected[2] == 0.0 and expected[4] == 0.0  # top_k 4 dropped them
    torch.testing.assert_close(counts, expected, atol=1.0 / num_draws, rtol=0)


def test_logprobs_are_the_models_own_whatever_the_sampling_settings():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.5]])
    raw = torch.log_softmax(logits, dim=-1)[0]
    sampling = _sampling(temperature=0.3, top_k=2, top_p=0.5)
    sampled, logprob = choose_tokens(logits, torch.tensor([0.7]), sampling)
    assert logprob.item() == pytest.approx(raw[sampled.item()].item())
    greedy, greedy_logprob = choose_tokens(logits, None, sampling)
    assert greedy.tolist() == [0] and greedy_logprob.item() == pytest.approx(raw[0].item())


# ----- seeds -----


def test_row_seeds_depend_on_every_key_and_nothing_else():
    seeds = {row_seed(*key) for key in [(1, 2, 3, 4), (0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4)]}
    seeds.add(row_seed(1, 2, 3, 0))
    assert len(seeds) == 5
    assert row_seed(1, 2, 3, 4) == row_seed(1, 2, 3, 4)
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_a_rows_uniforms_do_not_depend_on_the_other_rows_or_the_length():
    seeds = [row_seed(0, 0, prompt, 0) for prompt in range(3)]
    uniforms = sampling_uniforms(seeds, 16)
    alone = sampling_uniforms(seeds[2:], 5)
    assert torch.equal(alone[0], uniforms[2, :5])
    assert uniforms.dtype == torch.float64 and uniforms.min() >= 0.0 and uniforms.max() < 1.0
    assert not torch.equal(uniforms[0], uniforms[1])


# ----- the KV-cache loop on a plain Hugging Face model -----


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> LlamaForCausalLM:
    model = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_sampling"))
    model.set_attn_implementation(DECODING_ATTENTION)
    return model


def _prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.full((len(lengths), max(lengths) + 2), PAD_ID)  # right-padded, and more
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(2, VOCAB_SIZE, (length,), generator=generator)
    return input_ids, torch.tensor(lengths)


def _sample(model, input_ids, input_lengths, seeds, sampling, stops, greedy=False) -> Responses:
    budgets = torch.full((len(seeds),), sampling["max_new_tokens"])
    uniforms = None if greedy else sampling_uniforms(seeds, sampling["max_new_tokens"])
    with torch.no_grad():
        return sample_responses(
            model,
            input_ids,
            input_lengths,
            budgets=budgets,
            uniforms=uniforms,
            stop_token_ids=torch.tensor(stops),
            sampling=sampling,
            pad_token_id=PAD_ID,
        )


def test_a_row_samples_the_same_in_any_batch(tiny_model):
    # Uneven prompts and many stop tokens: rows end at different steps and the batch shrinks.
    input_ids, input_lengths = _prompts([7, 2, 5, 3, 9, 1])
    seeds = [row_seed(3, 1, prompt, 0) for prompt in range(6)]
    sampling = _sampling(temperature=1.3, top_k=40, top_p=0.95, max_new_tokens=12)
    stops = list(range(2, 14))
    batched = _sample(tiny_model, input_ids, input_lengths, seeds, sampling, stops)
    assert len(set(batched.lengths.tolist())) > 2, "the rows should end at different steps"
    for row in range(6):
        one = slice(row, row + 1)
        alone = _sample(tiny_model, input_ids[one], input_lengths[one], seeds[one], sampling, stops)
        length = int(alone.lengths[0])
        assert batched.lengths[row] == length
        assert torch.equal(batched.tokens[row], alone.tokens[0])
        torch.testing.assert_close(batched.logprobs[row], alone.logprobs[0], atol=1e-5, rtol=0)
        ended_on_stop = int(alone.tokens[0, length - 1]) in stops
        assert bool(batched.truncated[row]) == (not ended_on_stop)
        assert ended_on_stop or length == 12


def test_a_shared_prompt_is_prefilled_once_and_each_row_samples_as_alone(tiny_model):
    # Two groups of three rows, as repeat_prompts lays out a GRPO batch, each row its own seed;
    # then a prompt that left-pads to the same ids as the second one (its first token is the
    # padding id) but is one token longer: a prompt of its own.
    (first, second), _ = _prompts([5, 3])
    third = torch.cat([torch.tensor([PAD_ID]), second[:3]])
    input_ids = torch.full((7, 6), PAD_ID)
    input_lengths = torch.tensor([5, 5, 5, 3, 3, 3, 4])
    for row, prompt in enumerate([first] * 3 + [second] * 3 + [third]):
        input_ids[row, : input_lengths[row]] = prompt[: input_lengths[row]]
    seeds = [row_seed(3, 1, row // 3, row % 3) for row in range(7)]
    sampling = _sampling(max_new_tokens=6)
    prefill_shapes = []

    def record_prefill(_module, _args, kwargs):
        if not prefill_shapes:
            prefill_shapes.append(tuple(kwargs["input_ids"].shape))

    hook = tiny_model.register_forward_pre_hook(record_prefill, with_kwargs=True)
    try:
        batched = _sample(tiny_model, input_ids, input_lengths, seeds, sampling, [])
    finally:
        hook.remove()
    assert prefill_shapes == [(3, 5)], "one prefill row per distinct prompt"
    assert not torch.equal(batched.tokens[0], batched.tokens[1]), "the seeds differ"
    for row in range(7):
        one = slice(row, row + 1)
        alone = _sample(tiny_model, input_ids[one], input_lengths[one], seeds[one], sampling, [])
        assert torch.equal(batched.tokens[row], alone.tokens[0])
        torch.testing.assert_close(batched.logprobs[row], alone.logprobs[0], atol=1e-5, rtol=0)


def test_greedy_tokens_are_the_argmax_of_a_forward_of_the_sequence(tiny_model):
    input_ids, input_lengths = _prompts([4, 6])
    responses = _sample(tiny_model, input_ids, input_lengths, [0, 1], _sampling(), [], greedy=True)
    for row in range(2):
        sequence = torch.cat([input_ids[row, : input_lengths[row]], responses.tokens[row]])
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(sequence[None]).logits[0].float(), dim=-1)
        prompt_length = int(input_lengths[row])
        predicted = logprobs[prompt_length - 1 : -1]  # (M, V): each response token's position
        assert torch.equal(responses.tokens[row], predicted.argmax(dim=-1))
        chosen = predicted.gather(1, responses.tokens[row][:, None]).squeeze(1)
        torch.testing.assert_close(responses.logprobs[row], chosen, atol=1e-5, rtol=0)
    assert responses.truncated.all()


def test_no_prompt_means_no_forward(tiny_model):
    empty = _sample(
        tiny_model, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), [], _sampling(), []
    )
    assert empty.tokens.shape == (0, 0) and empty.truncated.shape == (0,)


def test_decoding_attention_is_restored(tiny_model):
    tiny_model.set_attn_implementation("eager")
    with decoding_attention(tiny_model):
        assert tiny_model.config._attn_implementation == DECODING_ATTENTION
    assert tiny_model.config._attn_implementation == "eager"
    tiny_model.set_attn_implementation(DECODING_ATTENTION)


def test_the_kv_cache_writes_into_buffers_allocated_once(tiny_model):
    cache = _kv_cache(tiny_model, capacity=5)
    assert len(cache.layers) == tiny_model.config.num_hidden_layers
    layer = cache.layers[0]
    prompt_keys, prompt_values = torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4)  # (b, H, P, D)
    layer.update(prompt_keys, prompt_values)
    buffer = layer.key_buffer.data_ptr()
    new_keys, new_values = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    keys, values = layer.update(new_keys, new_values)
    assert layer.key_buffer.data_ptr() == buffer, "no new allocation for a new token"
    assert torch.equal(keys, torch.cat([prompt_keys, new_keys], dim=2))
    assert torch.equal(values, torch.cat([prompt_values, new_values], dim=2))
    assert layer.get_seq_length() == 4 and cache.layers[1].get_seq_length() == 0
    # Rows dropped (or copied, for a shared prompt): the buffers follow.
    layer.batch_select_indices(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.keys, keys[[2, 0, 0]]) and torch.equal(layer.values, values[[2, 0, 0]])
    keys, _ = layer.update(new_keys, new_values)
    assert torch.equal(keys[:, :, 4:], new_keys) and keys.shape == (3, 2, 5, 4)


# ----- the rollout batch -----


def test_rollout_rows_are_prompt_then_response_then_padding():
    prompts = BatchedDataDict(
        input_ids=torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]]),
        input_lengths=torch.tensor([2, 1]),
        prompt_ids=torch.tensor([4, 4]),
        sample_idx=torch.tensor([0, 1]),
        answers=["a", "a"],
        group_size=2,
    )
    responses = Responses(
        tokens=torch.tensor([[8, 1, 0], [9, 10, 11]]),
        logprobs=torch.tensor([[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0]]),
        lengths=torch.tensor([2, 3]),
        truncated=torch.tensor([False, True]),
    )
    rollout = rollout_batch(prompts, responses, pad_token_id=0)
    assert rollout.group_size == 2
    assert rollout["input_ids"].tolist() == [[5, 6, 8, 1], [7, 9, 10, 11]]
    assert rollout["input_lengths"].tolist() == [4, 4]
    assert rollout["token_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert rollout["generation_logprobs"].tolist() == [[0, 0, -0.5, -0.25], [0, -1, -2, -3]]
    assert rollout["truncated"].tolist() == [False, True]
    assert rollout["prompt_ids"].tolist() == [4, 4] and rollout["answers"] == ["a", "a"]
    assert rollout["sample_idx"].tolist() == [0, 1]
