"""LoRA over two workers (two gloo processes, no Ray): DPO steps with the reference as the
adapters off give the same trajectory as one worker taking each batch whole, whatever the
micro-batches (1e-5, float32); and what two workers write (exports, checkpoint, refit) is what
one worker's training gives.

The two workers are plain PolicyWorkers in processes started here, as torchrun would start
them: sharding the adapters over ranks is what one in-process worker cannot show (each adapter
then merges from gathered shards, and the checkpoint holds shards that one worker reads back).
"""

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from rl_toolkit.algorithms.loss_functions import DPOLossFn
from rl_toolkit.config_schema import MicroBatches
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.generation.weight_sync import unpack_bucket
from rl_toolkit.models.policy.worker import PolicyWorker
from tests.unit.policy_testing import (
    LOGPROB_MBS,
    PACKED_TRAIN_MBS,
    make_batch,
    make_config,
    naive_logprobs,
    new_worker,
)

pytestmark = pytest.mark.slow  # a second process: its imports take 10-20 s on the 2-core machine

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
# As in test_sft_invariance: lr 1e-3 keeps Adam's moves of rounding-level gradients (summed in
# another order by another split) under the tolerance; the adapters still move far beyond it.
OPTIMIZER = {"name": "torch.optim.AdamW", "kwargs": {"lr": 1.0e-3, "weight_decay": 0.0}}
DPO_LOSS = {
    "reference_policy_kl_penalty": 0.5,
    "preference_loss_weight": 1.0,
    "sft_loss_weight": 0.1,
    "preference_average_log_probs": False,
    "sft_average_log_probs": False,
    "loss_type": "sigmoid",
    "label_smoothing": 0.0,
    "reference_free": False,
    "simpo_gamma": 0.0,
    "discopop_tau": 0.05,
}
SEEDS = (11, 12, 13)  # one global batch of 4 pairs (8 rows) per step
# Each of two workers takes 4 rows: micro-batches of 2 rows, 4 rows, then packed rows.
TWO_WORKER_MBS = (
    MicroBatches(packed=False, size=2),
    MicroBatches(packed=False, size=4),
    PACKED_TRAIN_MBS,
)
METRICS = ("loss", "grad_norm", "accuracy", "num_valid_samples")


def dpo_steps(worker: PolicyWorker, shards: list[BatchedDataDict], mbs: list[MicroBatches]):
    """The recipe's step on each shard: reference log-probs (adapters off), then train."""
    metrics = []
    for shard, micro_batches in zip(shards, mbs, strict=True):
        reference = worker.reference_logprobs(shard, LOGPROB_MBS, response_only=True)
        shard["reference_policy_logprobs"] = reference["reference_logprobs"]
        metrics.append(worker.train(shard, DPOLossFn(DPO_LOSS), micro_batches))
    return metrics


def _worker_run(rank: int, model_dir: str, out: str) -> None:
    """One of the two workers: the steps, both exports, a checkpoint and a refit."""
    worker = new_worker(make_config(Path(model_dir), lora=LORA, optimizer=OPTIMIZER))
    shards = [make_batch(seed).shard_by_batch_size(2)[rank] for seed in SEEDS]
    metrics = dpo_steps(worker, shards, list(TWO_WORKER_MBS))
    worker.export_hf(f"{out}/merged", export_lora="merged")
    worker.export_hf(f"{out}/adapter", export_lora="adapter")
    worker.save_checkpoint(f"{out}/weights")
    sent = {}
    for layout in worker.refit_layouts(bucket_bytes=2**14):
        buffer = worker.host_refit_bucket(layout)
        if buffer is not None:
            sent |= {name: tensor.clone() for name, tensor in unpack_bucket(layout, buffer)}
    worker.finish_refit()
    if rank == 0:
        save_file(sent, f"{out}/refit.safetensors")
        Path(f"{out}/metrics.json").write_text(json.dumps(metrics))
    worker.shutdown()


def _environment(rank: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _second_worker(port: int, model_dir: str, out: str) -> None:
    os.environ.update(_environment(1, port))
    _worker_run(1, model_dir, out)


def test_two_lora_workers_give_one_workers_steps_exports_and_checkpoint(
    tiny, tmp_path, free_port, monkeypatch
) -> None:
    path, base = tiny
    # Rank 1 in a process of its own (its imports overlap the one-worker run below); rank 0 in
    # this one, so that only one process pays for the imports.
    second = mp.get_context("spawn").Process(
        target=_second_worker, args=(free_port, str(path), str(tmp_path))
    )
    second.start()
    config = make_config(path, lora=LORA, optimizer=OPTIMIZER)
    one = new_worker(config)
    whole = MicroBatches(packed=False, size=8)
    expected = dpo_steps(one, [make_batch(seed) for seed in SEEDS], [whole] * len(SEEDS))
    data = make_batch(seed=14)
    expected_logprobs = one.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"]
    one.export_hf(str(tmp_path / "one"), export_lora="merged")
    one.shutdown()

    for key, value in _environment(0, free_port).items():
        monkeypatch.setenv(key, value)
    _worker_run(0, str(path), str(tmp_path))
    second.join(timeout=60)
    assert second.exitcode == 0
    monkeypatch.delenv("WORLD_SIZE")  # the worker below is a group of one again

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for step, (got, want) in enumerate(zip(metrics, expected, strict=True)):
        for key in METRICS:
            assert abs(got[key] - want[key]) <= 1e-5, f"step {step}: {key}"
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    torch.testing.assert_close(
        merged, load_file(tmp_path / "one" / "model.safetensors"), atol=1e-5, rtol=0
    )
    name = "model.layers.0.mlp.up_proj.weight"
    assert (merged[name] - base.state_dict()[name]).abs().max() > 1e-3  # the adapters moved
    # The refit gathers and merges each adapted layer as the export does, bit for bit.
    refit = load_file(tmp_path / "refit.safetensors")
    assert refit.keys() == base.state_dict().keys()  # safetensors sorts the names
    assert all(torch.equal(refit[name], tensor) for name, tensor in merged.items())
    # The adapter export and the checkpoint of two workers give one worker's log-probs.
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter"
    ).eval()
    torch.testing.assert_close(naive_logprobs(adapter, data), expected_logprobs, atol=1e-5, rtol=0)
    resumed = new_worker(config, weights_path=str(tmp_path / "weights"))
    torch.testing.assert_close(
        resumed.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"],
        expected_logprobs,
        atol=1e-5,
        rtol=0,
    )
    resumed.shutdown()
