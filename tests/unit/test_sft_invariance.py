"""SFT steps do not depend on how the global batch is split: workers x micro-batch x packing.

Three steps on real SFT batches (the tiny chat set: conversations of 1 or 2 turns, 5 or 10
learned tokens each) give the same loss and grad-norm trajectory and the same final weights
(1e-5, float32) for one worker taking each batch whole, two Ray CPU workers with micro-batches of
1, 2 and 4 rows, and one worker packing its rows by token budget (packing over two workers, with
uneven micro-batches, is test_packing_ray.py's).
"""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rl_toolkit.algorithms.loss_functions import NLLLossFn
from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.data import sft_collate_fn
from rl_toolkit.data.sft import SFTDataset, tokenize_sft_dataset
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.worker import PolicyWorker
from tests.conftest import WORKER_TIMEOUT_S
from tests.unit.policy_testing import make_config, new_worker
from tests.unit.test_sft_data import data_config

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "assets" / "tiny_llama"
ROWS_PER_STEP = 8
NUM_STEPS = 3

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def policy_config() -> dict:
    # Random weights seeded by policy.seed (the same for any number of workers). Adam moves a
    # weight by about lr whatever its gradient, so a gradient element that is ~0 up to rounding
    # (summed in another order by another split) moves by up to lr: 1e-3 keeps three steps of
    # that under the tolerance, and still moves the weights far beyond it.
    config = make_config(
        MODEL_DIR,
        random_init=True,
        train_global_batch_size=ROWS_PER_STEP,
        max_total_sequence_length=64,
        optimizer={"name": "torch.optim.AdamW", "kwargs": {"lr": 1.0e-3, "weight_decay": 0.0}},
    )
    return copy.deepcopy(config)


@pytest.fixture(scope="module")
def batches() -> list:
    """NUM_STEPS global batches of the tiny SFT set, as the recipe's loader builds them."""
    config = data_config(REPO / "assets" / "tiny_sft")  # its train.jsonl and val.jsonl
    dataset = SFTDataset(config)
    rows = dataset.formatted_ds["train"].select(range(ROWS_PER_STEP * NUM_STEPS))
    tokenized = tokenize_sft_dataset(
        rows, tokenizer(), dataset.task_spec, config, max_total_sequence_length=64
    )
    return [
        sft_collate_fn(
            [tokenized[i] for i in range(start, start + ROWS_PER_STEP)],
            pad_token_id=0,
            pad_to_multiple_of=8,
        )
        for start in range(0, len(tokenized), ROWS_PER_STEP)
    ]


def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def reference(batches, tmp_path_factory) -> tuple[list[dict], dict, dict]:
    """One in-process worker, each global batch as one micro-batch: the metrics of every step,
    the initial and the final weights."""
    path = tmp_path_factory.mktemp("reference")
    worker = new_worker(policy_config())
    worker.export_hf(str(path / "initial"))
    whole = MicroBatches(packed=False, size=ROWS_PER_STEP)
    metrics = [worker.train(batch, NLLLossFn(), whole) for batch in batches]
    worker.export_hf(str(path / "final"))
    worker.shutdown()
    initial, final = (load_file(path / name / "model.safetensors") for name in ("initial", "final"))
    return metrics, initial, final


def test_packed_rows_give_the_same_steps(batches, reference, tmp_path) -> None:
    expected_metrics, _, expected_weights = reference
    worker = new_worker(policy_config())
    packed = MicroBatches(packed=True, size=40)  # 1 or 2 sequences a micro-batch
    for step, batch in enumerate(batches):
        metrics = worker.train(batch, NLLLossFn(), packed)
        for key in ("loss", "grad_norm", "num_valid_tokens", "num_valid_samples"):
            expected = expected_metrics[step][key]
            assert metrics[key] == pytest.approx(expected, abs=1e-5), f"step {step}: {key}"
    worker.export_hf(str(tmp_path / "hf"))
    worker.shutdown()
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=0)


def test_two_workers_give_the_same_steps(batches, reference, tmp_path) -> None:
    # 4 rows a worker: 4, 2 and 1 micro-batches
    micro_batches = [MicroBatches(packed=False, size=size) for size in (1, 2, 4)]
    expected_metrics, initial_weights, expected_weights = reference
    cluster = RayVirtualCluster([2], use_gpus=False, name="sft-2w")
    policy = Policy(
        cluster,
        policy_config(),
        tokenizer(),
        init_optimizer=True,
        init_reference_model=False,
        worker_timeout_s=WORKER_TIMEOUT_S,
        worker_env_vars=[],
    )
    try:
        for step, (batch, mbs) in enumerate(zip(batches, micro_batches, strict=True)):
            metrics = policy.train(batch, NLLLossFn(), mbs)
            for key in ("loss", "grad_norm", "num_valid_tokens", "num_valid_samples"):
                expected = expected_metrics[step][key]
                assert metrics[key] == pytest.approx(expected, abs=1e-5), f"step {step}: {key}"
        policy.workers.all(PolicyWorker.export_hf, str(tmp_path / "hf"))
    finally:
        policy.shutdown()
        cluster.shutdown()
    # The learned tokens of a batch: 5 or 10 a conversation, never the user's.
    assert expected_metrics[0]["num_valid_tokens"] < batches[0]["input_lengths"].sum() / 2
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=0)
    moved = max((weights[k] - initial_weights[k]).abs().max() for k in weights)
    assert moved > 1e-3  # three steps moved the weights far beyond the tolerance
