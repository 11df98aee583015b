"""Packed, token-budget micro-batches on two Ray CPU workers: the same step as one worker."""

import pytest
import torch
from safetensors.torch import load_file

from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.models.packing import token_budget_groups
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.worker import PolicyWorker
from tests.conftest import WORKER_TIMEOUT_S
from tests.unit.policy_testing import (
    make_batch,
    make_config,
    make_tokenizer,
    naive_logprobs,
    new_worker,
    save_tiny_llama,
    sequence_margin_loss,
)

pytestmark = pytest.mark.usefixtures("ray_session")


TRAIN, LOGPROB = MicroBatches(packed=True, size=44), MicroBatches(packed=True, size=30)


def _config(model_dir):
    # SGD with lr 1: the weight change is the gradient itself, compared at float32 precision.
    return make_config(model_dir, optimizer={"name": "torch.optim.SGD", "kwargs": {"lr": 1.0}})


def test_two_packed_workers_with_uneven_micro_batches_match_one(tmp_path):
    hf_model = save_tiny_llama(tmp_path)
    data = make_batch(seed=40, num_pairs=4, seq_len=16)
    halves = (data["input_lengths"][:4], data["input_lengths"][4:])
    counts = [len(token_budget_groups(lengths, 2, 44)) for lengths in halves]
    assert counts[0] != counts[1], "the test needs workers with different micro-batch counts"

    worker = new_worker(_config(tmp_path))
    expected = worker.train(data, sequence_margin_loss, TRAIN)
    worker.export_hf(str(tmp_path / "one"))
    worker.shutdown()

    cluster = RayVirtualCluster([2], use_gpus=False, name="packed-2w")
    policy = Policy(
        cluster,
        _config(tmp_path),
        make_tokenizer(),
        init_optimizer=True,
        init_reference_model=True,
        worker_timeout_s=WORKER_TIMEOUT_S,
        worker_env_vars=[],
    )
    try:
        logprobs = policy.logprobs(data, LOGPROB)["logprobs"]
        # One pair for two workers: the second has no rows and runs a dummy forward.
        one_pair = data.select_indices([0, 1])
        one_pair_logprobs = policy.logprobs(one_pair, LOGPROB)["logprobs"]
        metrics = policy.train(data, sequence_margin_loss, TRAIN)
        policy.workers.all(PolicyWorker.export_hf, str(tmp_path / "two"))
    finally:
        policy.shutdown()
        cluster.shutdown()

    torch.testing.assert_close(logprobs, naive_logprobs(hf_model, data), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        one_pair_logprobs, naive_logprobs(hf_model, one_pair), atol=1e-5, rtol=0
    )
    for key in ("loss", "accuracy", "grad_norm", "num_valid_seqs"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5), key
    torch.testing.assert_close(
        load_file(tmp_path / "two" / "model.safetensors"),
        load_file(tmp_path / "one" / "model.safetensors"),
        atol=1e-5,
        rtol=0,
    )
