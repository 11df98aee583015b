"""The driver-side cache of reference log-probs: used for pairs seen before, cleared on sync."""

import torch

from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.reference_cache import ReferenceLogprobCache
from rl_toolkit.models.policy.worker import PolicyWorker
from tests.unit.policy_testing import make_batch

MBS = MicroBatches(packed=True, size=64)


def _batch(seed: int, pair_ids: list[int]) -> BatchedDataDict:
    data = make_batch(seed=seed, num_pairs=len(pair_ids))
    data["pair_ids"] = torch.tensor(pair_ids).repeat_interleave(2)
    return data


class _FakeReference:
    """Scores row i of any sub-batch as ``token * scale`` on its response tokens; counts rows."""

    def __init__(self) -> None:
        self.scale = 1.0
        self.rows_computed = 0

    def __call__(self, data: BatchedDataDict) -> BatchedDataDict:
        self.rows_computed += data.size
        values = data["input_ids"].float() * self.scale * data["token_mask"]  # (M, T)
        return BatchedDataDict({"reference_logprobs": values}, group_size=2)


def test_pairs_seen_before_come_from_the_cache():
    cache, reference = ReferenceLogprobCache(max_bytes=2**20), _FakeReference()
    data = _batch(seed=1, pair_ids=[3, 5, 7, -1])

    first = cache.get_or_compute(data, reference)
    again = cache.get_or_compute(data, reference)

    expected = reference(data)["reference_logprobs"]
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(again, expected)
    # 8 rows the first time, then only the padding pair (pair id -1) is computed again.
    assert reference.rows_computed == 8 + 2 + 8  # the last 8: the expected values above
    assert len(cache) == 6


def test_a_new_pair_or_other_tokens_under_the_same_id_are_computed():
    cache, reference = ReferenceLogprobCache(max_bytes=2**20), _FakeReference()
    cache.get_or_compute(_batch(seed=2, pair_ids=[0, 1]), reference)
    reference.rows_computed = 0

    # Pair 1 again with its tokens (cached), pair 0 with other tokens (e.g. the validation split's
    # pair 0) and a new pair 9: the two latter are computed.
    seen = _batch(seed=2, pair_ids=[0, 1]).select_indices([2, 3])
    other = _batch(seed=3, pair_ids=[0, 9])
    mixed = BatchedDataDict.from_batches([seen, other])
    result = cache.get_or_compute(mixed, reference)

    assert reference.rows_computed == 4
    torch.testing.assert_close(result, _FakeReference()(mixed)["reference_logprobs"])


class _FakeWorkerGroup:
    def __init__(self, reference: _FakeReference) -> None:
        self.reference = reference

    def sharded(self, method, data: BatchedDataDict, micro_batches, *, response_only) -> list:
        assert method is PolicyWorker.reference_logprobs
        assert micro_batches == MBS and response_only
        return [self.reference(data)]

    def all(self, method, mixup_alpha) -> None:
        assert method is PolicyWorker.update_reference_model
        self.reference.scale += mixup_alpha  # the reference moves


def test_policy_uses_the_cache_and_clears_it_when_the_reference_is_synced():
    reference = _FakeReference()
    policy = Policy.__new__(Policy)  # no Ray: only the facade's reference path is exercised
    policy.workers = _FakeWorkerGroup(reference)
    policy.reference_cache = ReferenceLogprobCache(max_bytes=2**20)
    data = _batch(seed=4, pair_ids=[0, 1, 2])

    before = policy.reference_logprobs(data, MBS)["reference_logprobs"]
    policy.reference_logprobs(data, MBS)
    assert reference.rows_computed == 6

    policy.update_reference_model(mixup_alpha=1.0)
    after = policy.reference_logprobs(data, MBS)["reference_logprobs"]

    assert reference.rows_computed == 12
    torch.testing.assert_close(after, 2.0 * before)
    assert after.abs().sum() > 0


def test_a_full_cache_stores_no_more_and_still_answers():
    # Each row stores its response tokens (4 bytes each); room for about one pair.
    data = _batch(seed=5, pair_ids=[0, 1, 2])
    per_pair = int(data["token_mask"][:2].sum()) * 4
    cache, reference = ReferenceLogprobCache(max_bytes=per_pair), _FakeReference()

    first = cache.get_or_compute(data, reference)
    assert len(cache) == 2 and cache.num_bytes == per_pair  # the first pair only
    again = cache.get_or_compute(data, reference)

    torch.testing.assert_close(again, first)
    assert reference.rows_computed == 6 + 4  # pairs 1 and 2 are computed again
    cache.clear()
    assert len(cache) == 0 and cache.num_bytes == 0
