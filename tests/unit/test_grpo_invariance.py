"""A GRPO step does not depend on how its global batch is split: workers x micro-batch x packing.

One rollout of the tiny model on 4 prompts of the embedded task, 2 completions each (sampled by
an in-process worker), with rewards set by hand so that three groups carry a signal and one has
none, GRPO advantages, the reference's log-probs and the full PG loss (clipped ratio, k3 KL in
the loss, entropy bonus). One optimizer step on it gives the same loss, KL, entropy, grad-norm
and weights (1e-5, float32) for one in-process worker taking the 8 rows as one micro-batch, two
Ray CPU workers with micro-batches of 2 rows (one group), and one worker packing rows by token
budget (packing over two workers, with uneven micro-batches, is test_packing_ray.py's).
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rl_toolkit.algorithms.grpo import compute_advantages
from rl_toolkit.algorithms.loss_functions import ClippedPGLossFn
from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.data import prompt_collate_fn, repeat_prompts
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.worker import PolicyWorker
from tests.conftest import WORKER_TIMEOUT_S
from tests.unit.policy_testing import make_config
from tests.unit.test_grpo_recipe import tiny

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "assets" / "tiny_llama"
GROUP, ROWS = 2, 8
LOGPROB_MBS = MicroBatches(packed=False, size=ROWS)

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def policy_config() -> dict:
    # As in test_sft_invariance: lr 1e-3 with Adam's eps keeps rounding-level gradient
    # differences far under the tolerance while the step moves the weights far beyond it.
    sampling = tiny()["policy"]["generation"]
    config = make_config(
        MODEL_DIR,
        random_init=True,
        train_global_batch_size=ROWS,
        optimizer={"name": "torch.optim.AdamW", "kwargs": {"lr": 1.0e-3, "weight_decay": 0.0}},
        generation=sampling,
    )
    return copy.deepcopy(config)


def loss_fn() -> ClippedPGLossFn:
    loss_config = tiny()["loss_fn"]
    loss_config |= {"reference_policy_kl_penalty": 0.05, "entropy_coef": 0.01}
    return ClippedPGLossFn(loss_config)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def new_worker(tokenizer) -> PolicyWorker:
    return PolicyWorker(
        config=policy_config(), tokenizer=tokenizer, init_optimizer=True, init_reference_model=True
    )


def one_step(worker: PolicyWorker, batch: BatchedDataDict, mbs: MicroBatches, path: Path) -> dict:
    """One step on `batch` in `mbs` micro-batches; the weights before and after go to `path`."""
    worker.export_hf(str(path / "initial"))
    metrics = worker.train(batch, loss_fn(), mbs)
    worker.export_hf(str(path / "final"))
    worker.shutdown()
    return metrics


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory) -> tuple[BatchedDataDict, dict, Path]:
    """The step's batch, and one in-process worker's step on it as one micro-batch: its
    metrics and the folder of the initial and final weights."""
    path = tmp_path_factory.mktemp("reference")
    lines = (REPO / "assets" / "tiny_rl" / "train.jsonl").read_text().splitlines()[:4]
    items = [
        {"prompt_id": i, "input_ids": torch.tensor(tokenizer(json.loads(line)["prompt"])["input_ids"]),
         "prompt": "", "metadata": {}}
        for i, line in enumerate(lines)
    ]  # fmt: skip
    worker = new_worker(tokenizer)
    prompts = repeat_prompts(prompt_collate_fn(items, pad_token_id=tokenizer.pad_token_id), GROUP)
    rollout = worker.generate(prompts, step=0, greedy=False)
    rollout["rewards"] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    reference = worker.reference_logprobs(rollout, LOGPROB_MBS, response_only=True)
    rollout["reference_policy_logprobs"] = reference["reference_logprobs"]
    rollout["advantages"] = compute_advantages(rollout, tiny("grpo.num_generations_per_prompt=2"))
    keys = ("input_ids", "input_lengths", "token_mask", "sample_mask", "advantages",
            "generation_logprobs", "reference_policy_logprobs")  # fmt: skip
    batch = BatchedDataDict({key: rollout[key] for key in keys}, group_size=GROUP)
    metrics = one_step(worker, batch, MicroBatches(packed=False, size=ROWS), path)
    return batch, metrics, path


def assert_same_step(metrics: dict, path: Path, reference: tuple) -> None:
    _, expected, expected_path = reference
    for key in ("loss", "kl", "entropy", "grad_norm", "num_valid_tokens"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5), key
    got, want = weights(path), weights(expected_path / "final")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    initial = weights(expected_path / "initial")
    moved = max((got[k] - initial[k]).abs().max() for k in got)
    assert moved > 1e-4  # the step moved the weights far beyond the tolerance


def test_the_reference_step_has_a_signal(reference) -> None:
    batch, expected, _ = reference
    assert batch["advantages"].abs().sum() > 0 and expected["entropy"] > 0
    assert expected["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at step 0


def test_packed_rows_give_the_same_step(reference, tokenizer, tmp_path) -> None:
    batch = reference[0]
    metrics = one_step(new_worker(tokenizer), batch, MicroBatches(packed=True, size=40), tmp_path)
    assert_same_step(metrics, tmp_path / "final", reference)


def test_two_workers_give_the_same_step(reference, tokenizer, tmp_path) -> None:
    batch = reference[0]
    cluster = RayVirtualCluster([2], use_gpus=False, name="grpo-2w")
    try:
        policy = Policy(
            cluster, policy_config(), tokenizer, init_optimizer=True, init_reference_model=False,
            worker_timeout_s=WORKER_TIMEOUT_S, worker_env_vars=[],
        )  # fmt: skip
        try:
            metrics = policy.train(batch, loss_fn(), MicroBatches(packed=False, size=GROUP))
            policy.workers.all(PolicyWorker.export_hf, str(tmp_path))
        finally:
            policy.shutdown()
    finally:
        cluster.shutdown()
    assert_same_step(metrics, tmp_path, reference)
