"""Token-budget micro-batches and padding-free packing: pure functions and the worker's use."""

import copy

import pytest
import torch

from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.models.packing import pack_rows, token_budget_groups
from rl_toolkit.models.policy.worker import PolicyWorker
from tests.unit.policy_testing import (
    LOGPROB_MBS,
    TRAIN_MBS,
    make_batch,
    make_config,
    naive_logprobs,
    new_worker,
    sequence_margin_loss,
)


def test_token_budget_groups_keep_pairs_whole_and_in_order():
    lengths = torch.tensor([3, 4, 5, 5, 2, 2, 20, 1])  # pair tokens: 7, 10, 4, 21

    groups = token_budget_groups(lengths, group_size=2, max_tokens=20)

    # 7 + 10 fit in 20; adding 4 would not; the 21-token pair exceeds the budget on its own.
    assert [g.tolist() for g in groups] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    assert token_budget_groups(torch.zeros(0, dtype=torch.long), 2, 20) == []
    with pytest.raises(ValueError, match="budget"):
        token_budget_groups(lengths, group_size=2, max_tokens=0)


def test_pack_rows_restarts_positions_and_drops_padding():
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    lengths = torch.tensor([3, 2, 4])

    packed, positions, cu_seq_lens = pack_rows(input_ids, lengths)

    assert packed.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert cu_seq_lens.tolist() == [0, 3, 5, 9]


def _worker(path, attn: str = "varlen") -> PolicyWorker:
    # SGD with lr 1: the weight change is the gradient itself (Adam would magnify the float
    # rounding of near-zero gradient entries).
    config = make_config(
        path,
        optimizer={"name": "torch.optim.SGD", "kwargs": {"lr": 1.0}},
        attn_implementation=attn,
    )
    return new_worker(config)


# varlen: rl_toolkit's per-sequence attention; sdpa: transformers' block-diagonal mask.
@pytest.mark.parametrize("attn", ["varlen", "sdpa"])
def test_packed_logprobs_equal_the_padded_path(tiny, attn):
    path, hf_model = tiny
    data = make_batch(seed=31, num_pairs=5, seq_len=16)
    expected = naive_logprobs(hf_model, data)  # (10, 16), the padded HF forward
    # A budget of 60 tokens puts two or three pairs in each packed row.
    worker = _worker(path, attn=attn)
    assert len(token_budget_groups(data["input_lengths"], 2, 60)) < 5
    packed_mbs = MicroBatches(packed=True, size=60)

    packed = worker.logprobs(data, packed_mbs, response_only=False)["logprobs"]
    reference = worker.reference_logprobs(data, packed_mbs, response_only=True)
    reference = reference["reference_logprobs"]
    padded = worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"]

    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=0)
    # Only the response tokens are scored for the reference: zero elsewhere.
    torch.testing.assert_close(reference, expected * data["token_mask"], atol=1e-5, rtol=0)
    assert torch.all(reference[data["token_mask"] == 0] == 0)
    worker.shutdown()


@pytest.mark.parametrize("attn", ["varlen", "sdpa"])
def test_packed_token_budget_step_equals_padded_step(tiny, attn):
    data = make_batch(seed=32, num_pairs=4, seq_len=16)
    metrics, weights = [], []
    # The padded step with transformers' own masked attention is the reference.
    for micro_batches, attn_implementation in (
        (TRAIN_MBS, "sdpa"),
        (MicroBatches(packed=True, size=30), attn),
    ):
        worker = _worker(tiny[0], attn_implementation)
        metrics.append(worker.train(copy.deepcopy(data), sequence_margin_loss, micro_batches))
        weights.append(
            {n: p.full_tensor().clone() for n, p in worker.model.causal_lm.named_parameters()}
        )
        worker.shutdown()

    assert metrics[1]["loss"] == pytest.approx(metrics[0]["loss"], abs=1e-6)
    assert metrics[1]["grad_norm"] == pytest.approx(metrics[0]["grad_norm"], abs=1e-5)
    torch.testing.assert_close(weights[1], weights[0], atol=1e-5, rtol=0)
