"""PolicyWorker.generate in this process (world size 1): backend hf on the FSDP2 worker."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models
from torch.distributed.tensor import DTensor
from transformers import PreTrainedTokenizerFast

from rl_toolkit.config_schema import PolicyConfig, SamplingConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.attention import VARLEN_ATTENTION
from rl_toolkit.models.policy.worker import PolicyWorker
from rl_toolkit.utils.config import validate_config
from tests.unit.policy_testing import (
    LOGPROB_MBS,
    PAD_ID,
    TRAIN_MBS,
    VOCAB_SIZE,
    make_batch,
    make_config,
    make_tokenizer,
    naive_logprobs,
    new_worker,
    token_nll_loss,
)


def sampling_config(**overrides: Any) -> SamplingConfig:
    """policy.generation for the tests: plain sampling, 6 new tokens, EOS as the only stop."""
    sampling: SamplingConfig = {
        "backend": "hf",
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": 6,
        "stop_token_ids": [],
    }
    sampling.update(overrides)
    return sampling


def generation_config(model_dir: Path, **sampling: Any) -> PolicyConfig:
    return make_config(model_dir, generation=sampling_config(**sampling))


def prompt_batch(
    lengths: list[int], *, group_size: int = 1, seed: int = 0, first_prompt: int = 0
) -> BatchedDataDict:
    """``len(lengths)`` prompts (right-padded), each repeated ``group_size`` times."""
    generator = torch.Generator().manual_seed(seed)
    num_rows = len(lengths) * group_size
    input_ids = torch.full((num_rows, max(lengths)), PAD_ID)
    for prompt, length in enumerate(lengths):
        tokens = torch.randint(2, VOCAB_SIZE, (length,), generator=generator)
        input_ids[prompt * group_size : (prompt + 1) * group_size, :length] = tokens
    return BatchedDataDict(
        input_ids=input_ids,
        input_lengths=torch.tensor(lengths).repeat_interleave(group_size),
        prompt_ids=torch.arange(first_prompt, first_prompt + len(lengths)).repeat_interleave(
            group_size
        ),
        sample_idx=torch.arange(group_size).repeat(len(lengths)),
        group_size=group_size,
    )


def response(rollout: BatchedDataDict, row: int) -> list[int]:
    mask = rollout["token_mask"][row] > 0
    return rollout["input_ids"][row][mask].tolist()


SAMPLING = {"temperature": 0.8, "top_k": 30, "top_p": 0.9}


@pytest.fixture(scope="module")
def worker(tiny) -> Iterator[PolicyWorker]:
    """One worker for the tests that do not train (its weights stay the initial ones)."""
    worker = new_worker(generation_config(tiny[0], **SAMPLING))
    yield worker
    worker.shutdown()


def test_generate_first_then_logprobs_match_and_training_works(tiny):
    # generate is this worker's first call: FSDP2's lazy set-up happens there.
    worker = new_worker(generation_config(tiny[0], **SAMPLING))
    try:
        _check_logprobs_and_training(tiny, worker)
    finally:
        worker.shutdown()


def _check_logprobs_and_training(tiny, worker: PolicyWorker) -> None:
    rollout = worker.generate(prompt_batch([5, 2, 7, 3]), step=0, greedy=False)

    # The rollout's log-probs are the trainer's on the generated tokens (temperature 1).
    logprobs = worker.logprobs(rollout, LOGPROB_MBS, response_only=False)["logprobs"]
    mask = rollout["token_mask"]
    assert mask.sum() > 0
    torch.testing.assert_close(rollout["generation_logprobs"], logprobs * mask, atol=1e-5, rtol=0)
    naive = naive_logprobs(tiny[1], rollout)
    torch.testing.assert_close(rollout["generation_logprobs"], naive * mask, atol=1e-5, rtol=0)
    # Weights are sharded again, the training attention is back, and a step trains.
    assert all(isinstance(param, DTensor) for param in worker.model.parameters())
    assert worker.hf_model.config._attn_implementation == VARLEN_ATTENTION
    assert worker.train(make_batch(seed=1), token_nll_loss, TRAIN_MBS)["grad_norm"] > 0


def test_rollout_layout(worker):
    prompts = prompt_batch([5, 2, 7], group_size=2)
    rollout = worker.generate(prompts, step=3, greedy=False)
    assert rollout.group_size == 2
    assert set(rollout) == {
        "input_ids",
        "input_lengths",
        "token_mask",
        "generation_logprobs",
        "truncated",
        "prompt_ids",
        "sample_idx",
    }
    assert rollout["input_ids"].shape[1] == int(rollout["input_lengths"].max())
    for row in range(6):
        length, prompt_length = (
            int(rollout["input_lengths"][row]),
            int(prompts["input_lengths"][row]),
        )
        assert torch.equal(
            rollout["input_ids"][row, :prompt_length], prompts["input_ids"][row, :prompt_length]
        )
        assert rollout["token_mask"][row].tolist() == [0.0] * prompt_length + [1.0] * (
            length - prompt_length
        ) + [0.0] * (rollout["input_ids"].shape[1] - length)
        assert (rollout["input_ids"][row, length:] == PAD_ID).all()
        assert (rollout["generation_logprobs"][row][rollout["token_mask"][row] == 0] == 0).all()


def test_sampling_is_seeded_per_step_prompt_and_sample(worker):
    prompts = prompt_batch([4, 6, 3], group_size=2)
    first = worker.generate(prompts, step=5, greedy=False)
    again = worker.generate(prompts, step=5, greedy=False)
    for key in ("input_ids", "generation_logprobs", "truncated"):
        assert torch.equal(first[key], again[key]), key  # bit-identical: what resume relies on

    # Another batch composition: the last prompt's group alone, then in reverse row order.
    alone = worker.generate(prompts.slice(4, 6), step=5, greedy=False)
    reverse = worker.generate(prompts.select_indices([5, 4, 3, 2, 1, 0]), step=5, greedy=False)
    for row in (4, 5):
        assert response(alone, row - 4) == response(first, row)
    for row in range(6):
        assert response(reverse, 5 - row) == response(first, row)
        torch.testing.assert_close(
            reverse["generation_logprobs"][5 - row].sum(),
            first["generation_logprobs"][row].sum(),
            atol=1e-5,
            rtol=0,
        )

    # The two samples of a prompt differ, and so does the next step.
    responses = [response(first, row) for row in range(6)]
    assert responses[0] != responses[1]
    next_step = worker.generate(prompts, step=6, greedy=False)
    assert [response(next_step, row) for row in range(6)] != responses


def test_greedy_tokens_are_the_argmax_of_the_logprobs(tiny, worker):
    rollout = worker.generate(prompt_batch([5, 3], group_size=2), step=0, greedy=True)
    _, hf_model = tiny
    for row in range(4):
        length = int(rollout["input_lengths"][row])
        with torch.no_grad():
            logits = hf_model(rollout["input_ids"][row : row + 1, :length]).logits[0]
        best = torch.log_softmax(logits.float(), dim=-1).argmax(dim=-1)  # best[t] predicts t + 1
        positions = rollout["token_mask"][row, :length].nonzero().squeeze(1)
        assert torch.equal(rollout["input_ids"][row, positions], best[positions - 1])
    # Greedy ignores the sample index: both samples of a prompt are the same.
    assert response(rollout, 0) == response(rollout, 1)


def _tokenizer_ending_with(eos_id: int) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token=f"t{eos_id}")


def test_eos_and_stop_tokens_end_a_response_and_budgets_truncate(tiny):
    prompts = prompt_batch([4, 6, 3])
    probe = new_worker(generation_config(tiny[0]))
    try:
        greedy = probe.generate(prompts, step=0, greedy=True)
    finally:
        probe.shutdown()
    assert (
        greedy["truncated"].all()
        and (greedy["input_lengths"] == prompts["input_lengths"] + 6).all()
    )
    greedy_responses = [response(greedy, row) for row in range(3)]
    # A token that row 0 generates third and that no row generates before it ends responses.
    stop = greedy_responses[0][2]
    assert all(stop not in tokens[:2] for tokens in greedy_responses)

    for tokenizer, stop_token_ids in (
        (_tokenizer_ending_with(stop), []),
        (make_tokenizer(), [stop]),
    ):
        worker = PolicyWorker(
            config=generation_config(tiny[0], stop_token_ids=stop_token_ids),
            tokenizer=tokenizer,
            init_optimizer=False,
            init_reference_model=False,
        )
        try:
            rollout = worker.generate(prompts, step=0, greedy=True)
        finally:
            worker.shutdown()
        for row, tokens in enumerate(greedy_responses):
            stopped_at = tokens.index(stop) + 1 if stop in tokens else None
            assert response(rollout, row) == tokens[:stopped_at]
            assert bool(rollout["truncated"][row]) == (stopped_at is None)


def test_the_sequence_limit_shortens_the_budget(tiny):
    worker = new_worker(generation_config(tiny[0], max_new_tokens=10))
    try:
        rollout = worker.generate(prompt_batch([29, 3]), step=0, greedy=True)  # limit: 32
        assert rollout["input_lengths"][0] == 32 and rollout["truncated"][0]  # 3 new tokens
        assert rollout["input_lengths"][1] <= 3 + 10
        with pytest.raises(ValueError, match="prompt 7 has 32 tokens: no room"):
            worker.generate(prompt_batch([32], first_prompt=7), step=0, greedy=True)
    finally:
        worker.shutdown()


def test_an_empty_shard_gives_an_empty_rollout(worker):
    rollout = worker.generate(prompt_batch([3]).slice(0, 0), step=0, greedy=False)
    assert rollout.size == 0
    assert set(rollout) >= {"input_ids", "token_mask", "generation_logprobs", "truncated"}


def test_the_schema_checks_policy_generation(tiny):
    validate_config(generation_config(tiny[0]), PolicyConfig, {})
    validate_config(make_config(tiny[0]), PolicyConfig, {})  # optional: DPO and SFT leave it out
    for key, value, message in (
        ("temperature", 0.0, "greater than 0"),
        ("top_p", 0.0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("top_k", -1, "greater than or equal to 0"),
        ("max_new_tokens", 0, "greater than or equal to 1"),
        ("backend", "sglang", "'hf' or 'vllm'"),
    ):
        bad = generation_config(tiny[0], **{key: value})
        with pytest.raises(ValueError, match=f"'generation.{key}': input should be .*{message}"):
            validate_config(bad, PolicyConfig, {})
