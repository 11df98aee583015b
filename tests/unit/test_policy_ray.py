"""The Policy facade on Ray CPU workers (gloo): invariance, reference, checkpoints, export."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from rl_toolkit.config_schema import MicroBatches, PolicyConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.worker import PolicyWorker
from tests.conftest import WORKER_TIMEOUT_S
from tests.unit.policy_testing import (
    LOGPROB_MBS,
    TRAIN_MBS,
    make_batch,
    make_config,
    make_tokenizer,
    naive_logprobs,
    new_worker,
    save_tiny_llama,
    sequence_margin_loss,
    token_nll_loss,
)

pytestmark = pytest.mark.usefixtures("ray_session")


class _PolicyOnCluster:
    """A Policy with its own cluster of ``num_workers`` CPU bundles; ``close`` frees both."""

    def __init__(self, num_workers: int, name: str, **policy_kwargs) -> None:
        self.cluster = RayVirtualCluster([num_workers], use_gpus=False, name=name)
        self.policy = Policy(
            self.cluster,
            tokenizer=make_tokenizer(),
            init_optimizer=True,
            init_reference_model=True,
            worker_timeout_s=WORKER_TIMEOUT_S,
            worker_env_vars=[],
            **policy_kwargs,
        )

    def close(self) -> None:
        self.policy.shutdown()
        self.cluster.shutdown()


def _config(model_dir: Path) -> PolicyConfig:
    # Random weights seeded by policy.seed: they must not depend on the number of workers.
    return make_config(model_dir, random_init=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, PreTrainedModel]:
    """The model directory and the HF model of its random initial weights (one worker)."""
    path = tmp_path_factory.mktemp("tiny_llama_ray")
    save_tiny_llama(path)
    worker = new_worker(_config(path))
    worker.export_hf(str(path / "initial"))
    worker.shutdown()
    return path, AutoModelForCausalLM.from_pretrained(path / "initial").eval()


@pytest.fixture(scope="module")
def two_workers(tiny) -> Iterator[Policy]:
    """One two-worker policy shared by the tests below, in file order (each says what it did)."""
    handle = _PolicyOnCluster(2, "policy-2w", config=_config(tiny[0]))
    yield handle.policy
    handle.close()


def _steps_in_process(model_dir, batches: list[BatchedDataDict], loss_fn, tmp_path) -> list:
    """Metrics and weights after each step of one in-process worker, one micro-batch per step."""
    worker = new_worker(_config(model_dir))
    results = []
    for step, data in enumerate(batches):
        metrics = worker.train(data, loss_fn, MicroBatches(packed=False, size=data.size))
        worker.export_hf(str(tmp_path / f"one_worker_{step}"))
        weights = load_file(tmp_path / f"one_worker_{step}" / "model.safetensors")
        results.append({"metrics": metrics, "weights": weights})
    worker.shutdown()
    return results


@pytest.mark.parametrize("num_pairs", [3, 1])
def test_logprobs_come_back_in_row_order(tiny, two_workers, num_pairs):
    # The workers get 2 and 1 pairs, or 1 and none: all run the same number of forwards.
    # Equal to one worker's log-probs: the random initial weights are the same.
    data = make_batch(seed=20 + num_pairs, num_pairs=num_pairs)
    logprobs = two_workers.logprobs(data, LOGPROB_MBS)["logprobs"]
    torch.testing.assert_close(logprobs, naive_logprobs(tiny[1], data), atol=1e-5, rtol=0)


def test_same_step_for_any_split_of_the_global_batch(tiny, two_workers, tmp_path):
    """1 worker x 8 rows == 2 workers x 2 rows per micro-batch == 2 workers x 4 rows.

    Step 1 splits the global batch into micro-batches of 2 rows (one pair) per worker, step 2
    into 4 rows; both must match a single worker that takes the whole batch at once.
    """
    batches = [make_batch(seed=22), make_batch(seed=23)]
    expected = _steps_in_process(tiny[0], batches, sequence_margin_loss, tmp_path)

    for step, (data, mbs) in enumerate(zip(batches, (2, 4), strict=True)):
        metrics = two_workers.train(data, sequence_margin_loss, MicroBatches(False, mbs))
        two_workers.workers.all(PolicyWorker.export_hf, str(tmp_path / f"two_workers_{step}"))

        for key in ("loss", "accuracy", "grad_norm", "num_valid_seqs", "num_valid_tokens"):
            assert metrics[key] == pytest.approx(expected[step]["metrics"][key], abs=1e-5), key
        weights = load_file(tmp_path / f"two_workers_{step}" / "model.safetensors")
        torch.testing.assert_close(weights, expected[step]["weights"], atol=1e-5, rtol=0)


def test_reference_stays_initial_through_training_save_and_resume(tiny, two_workers, tmp_path):
    # two_workers has taken two steps above; two more here.
    data = make_batch(seed=26)
    initial = naive_logprobs(tiny[1], data)
    for _ in range(2):
        two_workers.train(data, token_nll_loss, TRAIN_MBS)
    trained = two_workers.logprobs(data, LOGPROB_MBS)["logprobs"]
    assert not torch.allclose(trained, initial, atol=1e-3)
    reference = two_workers.reference_logprobs(data, LOGPROB_MBS)["reference_logprobs"]
    torch.testing.assert_close(reference, initial * data["token_mask"], atol=1e-5, rtol=0)
    eval_metrics = two_workers.evaluate(data, token_nll_loss, LOGPROB_MBS)
    torch.testing.assert_close(two_workers.logprobs(data, LOGPROB_MBS)["logprobs"], trained)
    assert "grad_norm" not in eval_metrics

    ckpt = tmp_path / "step_4"
    two_workers.workers.all(
        PolicyWorker.save_checkpoint,
        weights_path=str(ckpt / "weights"),
        optimizer_path=str(ckpt / "optimizer"),
        tokenizer_path=str(ckpt / "tokenizer"),
    )
    # Resume with a different number of workers, in a new group of processes.
    resumed = _PolicyOnCluster(
        1,
        "policy-resumed",
        config=_config(tiny[0]),
        weights_path=str(ckpt / "weights"),
        optimizer_path=str(ckpt / "optimizer"),
    )
    try:
        torch.testing.assert_close(
            resumed.policy.logprobs(data, LOGPROB_MBS)["logprobs"], trained, atol=1e-5, rtol=0
        )
        resumed_reference = resumed.policy.reference_logprobs(data, LOGPROB_MBS)
        torch.testing.assert_close(
            resumed_reference["reference_logprobs"], initial * data["token_mask"], atol=1e-5, rtol=0
        )
        # Optimizer and scheduler resumed too: the next step is the same on both.
        after_resume = resumed.policy.train(data, token_nll_loss, MicroBatches(False, 8))
        after_original = two_workers.train(data, token_nll_loss, TRAIN_MBS)
        assert after_resume["grad_norm"] == pytest.approx(after_original["grad_norm"], abs=1e-5)
        torch.testing.assert_close(
            resumed.policy.logprobs(data, LOGPROB_MBS)["logprobs"],
            two_workers.logprobs(data, LOGPROB_MBS)["logprobs"],
            atol=1e-5,
            rtol=0,
        )
    finally:
        resumed.close()
    assert (ckpt / "tokenizer" / "tokenizer.json").exists()


def test_reference_sync_and_hf_export(tiny, two_workers, tmp_path):
    data = make_batch(seed=24)
    two_workers.update_reference_model(mixup_alpha=1.0)
    policy_logprobs = two_workers.logprobs(data, LOGPROB_MBS)["logprobs"]
    reference = two_workers.reference_logprobs(data, LOGPROB_MBS)["reference_logprobs"]
    torch.testing.assert_close(reference, policy_logprobs * data["token_mask"], atol=1e-6, rtol=0)

    two_workers.workers.all(PolicyWorker.export_hf, str(tmp_path / "hf"))

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(naive_logprobs(exported, data), policy_logprobs, atol=1e-5, rtol=0)


def test_train_rejects_a_batch_of_the_wrong_size(two_workers):
    with pytest.raises(ValueError, match="global batch size is 8 rows"):
        two_workers.train(make_batch(seed=25, num_pairs=3), token_nll_loss, TRAIN_MBS)
