"""Policy.generate on two Ray CPU workers: the tokens of one in-process worker, any shard sizes."""

from collections.abc import Iterator

import pytest
import torch

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.utils.config import ConfigError
from tests.conftest import WORKER_TIMEOUT_S
from tests.unit.policy_testing import LOGPROB_MBS, make_tokenizer, new_worker
from tests.unit.test_policy_generation import generation_config, prompt_batch

# Starts a two-worker policy: 30-60 s on the shared 2-core machine.
pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

# Sampling with many stop tokens: the responses end at different steps on each worker.
SAMPLING = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "stop_token_ids": list(range(2, 12))}
STEP = 4


@pytest.fixture(scope="module")
def expected(tiny) -> dict[str, BatchedDataDict]:
    """What one in-process worker generates: 3 prompts x 2 samples, and 3 single samples."""
    worker = new_worker(generation_config(tiny[0], **SAMPLING))
    try:
        return {
            "groups": worker.generate(
                prompt_batch([5, 2, 7], group_size=2), step=STEP, greedy=False
            ),
            "single": worker.generate(prompt_batch([4, 6, 3]), step=STEP, greedy=False),
        }
    finally:
        worker.shutdown()


@pytest.fixture(scope="module")
def two_workers(tiny) -> Iterator[Policy]:
    cluster = RayVirtualCluster([2], use_gpus=False, name="generation-2w")
    policy = Policy(
        cluster,
        generation_config(tiny[0], **SAMPLING),
        make_tokenizer(),
        init_optimizer=False,
        init_reference_model=False,
        worker_timeout_s=WORKER_TIMEOUT_S,
        worker_env_vars=[],
    )
    yield policy
    policy.shutdown()
    cluster.shutdown()


def _assert_same_rollout(actual: BatchedDataDict, expected: BatchedDataDict) -> None:
    assert actual.group_size == expected.group_size and set(actual) == set(expected)
    width = int(expected["input_lengths"].max())  # expected may be rows of a wider batch
    expected = BatchedDataDict(
        {key: value[:, :width] if value.dim() == 2 else value for key, value in expected.items()}
    )
    for key in ("input_ids", "input_lengths", "token_mask", "truncated", "prompt_ids"):
        assert torch.equal(actual[key], expected[key]), key
    torch.testing.assert_close(
        actual["generation_logprobs"], expected["generation_logprobs"], atol=1e-5, rtol=0
    )


def test_two_workers_sample_the_tokens_of_one(expected, two_workers):
    # 3 groups on 2 workers: 2 prompts on one, 1 on the other, responses of uneven lengths.
    rollout = two_workers.generate(prompt_batch([5, 2, 7], group_size=2), step=STEP)
    _assert_same_rollout(rollout, expected["groups"])
    new_tokens = rollout["token_mask"].sum(dim=1)
    assert len(set(new_tokens.tolist())) > 2, "the responses should end at different steps"
    # group_size 1: 2 rows and 1 row
    _assert_same_rollout(
        two_workers.generate(prompt_batch([4, 6, 3]), step=STEP), expected["single"]
    )


def test_fewer_prompts_than_workers(expected, two_workers):
    # One group: worker 1 gets no row and still takes part (the gather of the weights).
    rollout = two_workers.generate(prompt_batch([5, 2, 7], group_size=2).slice(0, 2), step=STEP)
    _assert_same_rollout(rollout, expected["groups"].slice(0, 2))
    # The same policy still computes log-probs after it (nothing left gathered or waiting).
    logprobs = two_workers.logprobs(rollout, LOGPROB_MBS)["logprobs"]
    mask = rollout["token_mask"]
    torch.testing.assert_close(rollout["generation_logprobs"], logprobs * mask, atol=1e-5, rtol=0)


def test_driver_side_mistakes_fail_before_any_worker_is_called(two_workers, monkeypatch):
    too_long = prompt_batch([32], first_prompt=9)  # policy.max_total_sequence_length: 32
    with pytest.raises(ValueError, match="prompt 9 has 32 tokens: no room for a response"):
        two_workers.generate(too_long, step=STEP)
    assert not two_workers.workers.broken
    monkeypatch.setattr(two_workers, "generation", None)  # what a DPO or SFT config gives
    with pytest.raises(ConfigError, match="policy.generation is not set"):
        two_workers.generate(prompt_batch([3]), step=STEP)
