"""Weight refit without vLLM: buckets (sizes, layout, round trip), what a policy worker sends
(names, dtypes, tied weights once, buffers), and the refit check's token_mult_prob_error."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rl_toolkit.algorithms.refit_check import (
    RefitMismatchError,
    check_refit,
    token_mult_prob_error,
)
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.generation.weight_sync import (
    ALIGN_BYTES,
    bucket_layout,
    plan_refit,
    tensor_view,
    unpack_bucket,
    weight_buckets,
)
from rl_toolkit.models.policy.worker import PolicyWorker
from tests.unit.policy_testing import make_config, new_worker, save_tiny_llama

TINY_LLAMA = Path(__file__).resolve().parents[2] / "assets" / "tiny_llama"


def named(
    *shapes_and_dtypes: tuple[tuple[int, ...], torch.dtype],
) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for i, (shape, dtype) in enumerate(shapes_and_dtypes):
        values = torch.randn(shape, generator=generator) * 100
        tensors.append((f"t{i}", values.to(dtype)))
    return tensors


# ---------------------------------------------------------------------------------------------
# Buckets


def test_buckets_keep_order_and_size_and_a_large_tensor_goes_alone() -> None:
    tensors = named(((10,), torch.float32), ((10,), torch.float32), ((300,), torch.float32),
                    ((5,), torch.bfloat16), ((7,), torch.int64))  # fmt: skip
    # Each tensor takes a multiple of 256 bytes; the 300-float one (1200 bytes) exceeds a bucket.
    buckets = list(weight_buckets(tensors, bucket_bytes=2 * ALIGN_BYTES))
    assert [[name for name, _ in bucket] for bucket in buckets] == [
        ["t0", "t1"], ["t2"], ["t3", "t4"]
    ]  # fmt: skip
    layouts = [bucket_layout(bucket) for bucket in buckets]
    assert [layout.nbytes for layout in layouts] == [512, 1280, 512]
    assert all(spec.offset % ALIGN_BYTES == 0 for layout in layouts for spec in layout.tensors)


def test_a_bucket_round_trips_through_its_flat_buffer() -> None:
    tensors = named(((3, 5), torch.float32), ((4,), torch.bfloat16), ((2, 2), torch.int64),
                    ((1,), torch.float16))  # fmt: skip
    layout = bucket_layout(tensors)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for spec, (_, tensor) in zip(layout.tensors, tensors, strict=True):
        tensor_view(buffer, spec).copy_(tensor)
    unpacked = unpack_bucket(layout, buffer.clone())  # e.g. after a trip through Ray
    assert [name for name, _ in unpacked] == [name for name, _ in tensors]
    for (_, got), (_, want) in zip(unpacked, tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_the_plan_casts_floating_tensors_to_the_compute_dtype_only() -> None:
    state = {"w": torch.zeros(4, 4), "step": torch.zeros(3, dtype=torch.int64)}
    (layout,) = plan_refit(state, torch.bfloat16, bucket_bytes=2**20)
    assert [(s.name, s.dtype, s.shape) for s in layout.tensors] == [
        ("w", torch.bfloat16, (4, 4)), ("step", torch.int64, (3,))
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# What the policy worker sends


def refit(worker: PolicyWorker, bucket_bytes: int) -> tuple[list, dict[str, torch.Tensor]]:
    """The layouts of a refit and every tensor sent (transport "object", world size 1)."""
    layouts = worker.refit_layouts(bucket_bytes)
    sent: dict[str, torch.Tensor] = {}
    for layout in layouts:
        buffer = worker.host_refit_bucket(layout)
        assert buffer is not None and buffer.device.type == "cpu"
        for name, tensor in unpack_bucket(layout, buffer):
            assert name not in sent, f"{name} sent twice"
            sent[name] = tensor
    worker.finish_refit()
    return layouts, sent


def test_the_tiny_model_goes_whole_in_hf_names_and_buckets_of_the_size(tmp_path) -> None:
    config = make_config(TINY_LLAMA, random_init=True)
    worker = new_worker(config)
    try:
        bucket_bytes = 40_000  # each 64 KiB MLP matrix goes alone; smaller tensors share
        layouts, sent = refit(worker, bucket_bytes)
    finally:
        worker.shutdown()
    # The weights random_init builds on rank 0 (fsdp/build.py), as Hugging Face names them.
    torch.manual_seed(config["seed"])
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA))
    expected = reference.state_dict()
    assert list(sent) == list(expected)  # every tensor, in state-dict order
    for name, tensor in expected.items():
        assert sent[name].dtype == torch.float32 and torch.equal(sent[name], tensor), name
    assert any(len(layout.tensors) > 1 for layout in layouts)
    assert any(layout.nbytes > bucket_bytes for layout in layouts)
    for layout in layouts:
        assert layout.nbytes <= bucket_bytes or len(layout.tensors) == 1


def test_tied_weights_go_once_and_persistent_buffers_go_too(tmp_path) -> None:
    save_tiny_llama(tmp_path, tie_word_embeddings=True)
    worker = new_worker(make_config(tmp_path))
    try:
        # A persistent buffer goes in its own dtype; rotary inv_freq is not persistent.
        worker.hf_model.model.register_buffer("marker", torch.tensor([3, 4]), persistent=True)
        _, sent = refit(worker, bucket_bytes=2**20)
    finally:
        worker.shutdown()
    assert "lm_head.weight" not in sent and "model.embed_tokens.weight" in sent
    assert sent["model.marker"].dtype == torch.int64 and sent["model.marker"].tolist() == [3, 4]
    assert not any("inv_freq" in name for name in sent)


# ---------------------------------------------------------------------------------------------
# The refit check


def test_token_mult_prob_error_by_hand() -> None:
    generation = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    policy = torch.tensor([[-1.5, -2.0, 9.0], [-0.25, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the 9.0 is off the response
    expected = (math.exp(0.5) + math.exp(0.0) + math.exp(0.25)) / 3
    assert token_mult_prob_error(generation, policy, mask) == pytest.approx(expected, abs=1e-12)
    assert token_mult_prob_error(generation, generation, mask) == 1.0
    assert token_mult_prob_error(generation, policy, torch.zeros_like(mask)) == 1.0


class LogprobPolicy:
    """Policy.logprobs returning fixed values."""

    def __init__(self, logprobs: torch.Tensor) -> None:
        self.values = logprobs

    def logprobs(self, data: BatchedDataDict, micro_batches) -> BatchedDataDict:
        return BatchedDataDict({"logprobs": self.values})


def policy_config(threshold: float) -> dict:
    generation = {"backend": "vllm", "vllm": {"refit_check_threshold": threshold}}
    return {"generation": generation, "micro_batch": {"unit": "rows", "train": 1, "logprob": 2}}


def test_the_refit_check_passes_close_log_probs_and_fails_far_ones_naming_the_backend() -> None:
    rollout = BatchedDataDict(
        generation_logprobs=torch.tensor([[0.0, -1.0, -1.0]]),
        token_mask=torch.tensor([[0.0, 1.0, 1.0]]),
    )
    close = LogprobPolicy(torch.tensor([[0.0, -1.01, -0.99]]))
    assert check_refit(close, rollout, policy_config(1.05)) == pytest.approx(math.exp(0.01))
    far = LogprobPolicy(torch.tensor([[0.0, -3.0, -1.0]]))  # a wrong weight: a gap of 2 nats
    with pytest.raises(RefitMismatchError) as error:
        check_refit(far, rollout, policy_config(1.05))
    message = str(error.value)
    assert "\n" not in message and "policy.generation.backend=vllm" in message
    assert f"token_mult_prob_error={(math.exp(2) + 1) / 2:.4f} > " in message
    assert "refit_check_threshold=1.05" in message
