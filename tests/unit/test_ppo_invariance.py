"""A critic step does not depend on how its global batch is split: workers x micro-batch x
packing.

One rollout-shaped batch of 8 rows of the tiny model (groups of 2, one group masked out), old
values near the critic's own (as in a later epoch) and GAE returns of rewards set by hand, the
clipped value loss. One optimizer step gives the same loss, grad-norm and weights (1e-5,
float32) for one in-process worker taking the 8 rows as one micro-batch, one packing them by
token budget, and two Ray CPU workers with micro-batches of one group.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl_toolkit.algorithms.advantages import gae, token_rewards
from rl_toolkit.algorithms.loss_functions import ValueLossFn
from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.models.value.value_model import ValueModel
from rl_toolkit.models.value.worker import ValueWorker
from tests.conftest import WORKER_TIMEOUT_S
from tests.unit.policy_testing import make_batch, make_tokenizer
from tests.unit.test_value_worker import critic_config

GROUP, ROWS = 2, 8

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def config(model_dir: Path) -> dict:
    # As in the GRPO test: lr 1e-3 moves the weights far beyond the tolerance in one step.
    optimizer = {"name": "torch.optim.AdamW", "kwargs": {"lr": 1.0e-3, "weight_decay": 0.0}}
    return critic_config(model_dir, train_global_batch_size=ROWS, optimizer=optimizer)


def one_step(worker: ValueWorker, batch: BatchedDataDict, mbs: MicroBatches, path: Path) -> dict:
    worker.export_hf(str(path / "initial"))
    metrics = worker.train(batch, ValueLossFn({"value_clip": 0.05}), mbs)
    worker.export_hf(str(path / "final"))
    return metrics


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> tuple[BatchedDataDict, dict, Path]:
    """The step's batch, and one in-process worker's step on it as one micro-batch."""
    path = tmp_path_factory.mktemp("reference")
    batch = BatchedDataDict(make_batch(seed=5, num_pairs=ROWS // GROUP), group_size=GROUP)
    worker = ValueWorker(
        config=config(tiny[0]), tokenizer=make_tokenizer(), section="critic", init_optimizer=True
    )
    values = worker.get_values(batch, MicroBatches(packed=False, size=ROWS))["values"]
    # The rollout's values as an earlier critic gave them (a later epoch's view): the clip acts.
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(0))
    batch["values"] = values + 0.1 * noise * batch["token_mask"]
    rewards = token_rewards(
        torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0]), batch["token_mask"], kl=None,
        beta=0.0,
    )  # fmt: skip
    _, batch["returns"] = gae(rewards, batch["values"], batch["token_mask"], gamma=1.0, lam=0.9)
    metrics = one_step(worker, batch, MicroBatches(packed=False, size=ROWS), path)
    worker.shutdown()
    return batch, metrics, path


def assert_same_step(metrics: dict, path: Path, reference: tuple) -> None:
    _, expected, expected_path = reference
    for key in ("loss", "grad_norm", "value_clip_fraction", "value_mean", "num_valid_tokens"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5), key
    got, want = (load_file(p / "model.safetensors") for p in (path, expected_path / "final"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    initial = load_file(expected_path / "initial" / "model.safetensors")
    assert max((got[k] - initial[k]).abs().max() for k in got) > 1e-4  # the step moved them


def test_the_reference_step_has_a_signal(reference) -> None:
    batch, metrics, _ = reference
    assert batch["sample_mask"][-GROUP:].sum() == 0  # a masked group counts for nothing
    assert metrics["loss"] > 0 and 0 < metrics["value_clip_fraction"] < 1


def test_packed_rows_give_the_same_step(reference, tiny, tmp_path) -> None:
    worker = ValueWorker(
        config=config(tiny[0]), tokenizer=make_tokenizer(), section="critic", init_optimizer=True
    )
    metrics = one_step(worker, reference[0], MicroBatches(packed=True, size=40), tmp_path)
    worker.shutdown()
    assert_same_step(metrics, tmp_path / "final", reference)


def test_two_workers_give_the_same_step(reference, tiny, tmp_path) -> None:
    cluster = RayVirtualCluster([2], use_gpus=False, name="ppo-2w")
    try:
        critic = ValueModel(
            cluster, config(tiny[0]), make_tokenizer(), section="critic", init_optimizer=True,
            worker_timeout_s=WORKER_TIMEOUT_S, worker_env_vars=[],
        )  # fmt: skip
        try:
            metrics = critic.train(
                reference[0],
                ValueLossFn({"value_clip": 0.05}),
                MicroBatches(packed=False, size=GROUP),
            )
            critic.workers.all(ValueWorker.export_hf, str(tmp_path / "final"))
        finally:
            critic.shutdown()
    finally:
        cluster.shutdown()
    assert_same_step(metrics, tmp_path / "final", reference)
