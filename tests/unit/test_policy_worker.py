"""The plain FSDP2 policy worker in this process (world size 1, gloo), without Ray."""

import copy
import math
import pickle
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_toolkit.algorithms.loss_functions import ClippedPGLossFn, DPOLossFn
from rl_toolkit.config_schema import MicroBatches, PolicyConfig
from rl_toolkit.models.policy.worker import PolicyWorker
from rl_toolkit.utils.config import validate_config
from rl_toolkit.utils.safe_load import CheckpointError
from tests.unit.malicious import RunsCode
from tests.unit.policy_testing import (
    LOGPROB_MBS,
    PACKED_LOGPROB_MBS,
    PACKED_TRAIN_MBS,
    TRAIN_MBS,
    make_batch,
    make_config,
    naive_logprobs,
    new_worker,
    save_tiny_llama,
    sequence_margin_loss,
    token_nll_loss,
)
from tests.unit.test_pg_losses import config as pg_loss_config


@pytest.fixture
def worker(tiny) -> Iterator[PolicyWorker]:
    worker = new_worker(make_config(tiny[0]))
    yield worker
    worker.shutdown()


def _parameters(worker: PolicyWorker) -> dict[str, torch.Tensor]:
    return {
        name: param.full_tensor().detach().clone()
        for name, param in worker.model.causal_lm.named_parameters()
    }


def test_logprobs_match_the_hf_model(tiny, worker):
    path, hf_model = tiny
    data = make_batch(seed=1, num_pairs=3)

    logprobs = worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"]
    reference = worker.reference_logprobs(data, LOGPROB_MBS, response_only=True)[
        "reference_logprobs"
    ]

    expected = naive_logprobs(hf_model, data)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
    # The reference scores only the response tokens (token_mask), which is all the loss reads.
    torch.testing.assert_close(reference, expected * data["token_mask"], atol=1e-5, rtol=0)


def test_train_step_changes_weights_and_reports_global_metrics(worker):
    data = make_batch(seed=2)
    before = _parameters(worker)

    metrics = worker.train(data, token_nll_loss, TRAIN_MBS)

    mask = data["token_mask"] * data["sample_mask"][:, None]
    assert metrics["num_valid_seqs"] == 6.0
    assert metrics["num_valid_tokens"] == mask.sum().item()
    assert metrics["num_tokens"] == mask.sum().item()  # the loss's own metric, summed
    assert metrics["global_num_tokens"] == (data["input_lengths"] * data["sample_mask"]).sum()
    assert metrics["loss"] == pytest.approx(metrics["nll"])
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(1e-2)
    after = _parameters(worker)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_eval_mode_changes_no_parameter(worker):
    data = make_batch(seed=3)
    before = _parameters(worker)

    metrics = worker.evaluate(data, sequence_margin_loss, LOGPROB_MBS)

    assert set(metrics) >= {"loss", "accuracy", "num_valid_seqs"}
    assert "grad_norm" not in metrics
    after = _parameters(worker)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(param.grad is None for param in worker.model.parameters())


def test_reference_stays_initial_and_mixes_in_the_policy(tiny, worker):
    data = make_batch(seed=4)
    initial = naive_logprobs(tiny[1], data)
    for _ in range(3):
        worker.train(data, token_nll_loss, TRAIN_MBS)
    assert worker.reference is not None and not worker.reference.synced
    torch.testing.assert_close(
        worker.reference_logprobs(data, LOGPROB_MBS, response_only=True)["reference_logprobs"],
        initial * data["token_mask"],
        atol=1e-5,
        rtol=0,
    )

    worker.update_reference_model(mixup_alpha=1.0)

    policy = worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"]
    assert not torch.allclose(policy, initial, atol=1e-3)
    torch.testing.assert_close(
        worker.reference_logprobs(data, LOGPROB_MBS, response_only=True)["reference_logprobs"],
        policy * data["token_mask"],
        atol=1e-6,
        rtol=0,
    )


def test_synced_reference_survives_save_and_resume(tiny, worker, tmp_path):
    data = make_batch(seed=5)
    worker.train(data, token_nll_loss, TRAIN_MBS)
    worker.update_reference_model(mixup_alpha=0.5)
    worker.train(data, token_nll_loss, TRAIN_MBS)
    policy = worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"]
    reference = worker.reference_logprobs(data, LOGPROB_MBS, response_only=True)[
        "reference_logprobs"
    ]
    worker.save_checkpoint(str(tmp_path / "weights"), str(tmp_path / "optimizer"))

    resumed = new_worker(
        make_config(tiny[0]),
        weights_path=str(tmp_path / "weights"),
        optimizer_path=str(tmp_path / "optimizer"),
    )

    assert resumed.reference.synced
    torch.testing.assert_close(
        resumed.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"],
        policy,
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        resumed.reference_logprobs(data, LOGPROB_MBS, response_only=True)["reference_logprobs"],
        reference,
        atol=1e-6,
        rtol=0,
    )
    # The optimizer resumed too: one more step is the same step in both workers.
    worker.train(data, token_nll_loss, TRAIN_MBS)
    resumed.train(data, token_nll_loss, TRAIN_MBS)
    torch.testing.assert_close(_parameters(resumed), _parameters(worker), atol=1e-6, rtol=0)


@pytest.mark.parametrize("planted", ["optimizer/scheduler.pt", "weights/.metadata"])
def test_resume_refuses_a_checkpoint_that_would_run_code(tiny, worker, tmp_path, planted):
    worker.save_checkpoint(str(tmp_path / "weights"), str(tmp_path / "optimizer"))
    marker = tmp_path / "code_ran"
    if planted.endswith(".pt"):
        torch.save({"last_epoch": 1, "_last_lr": RunsCode(marker)}, tmp_path / planted)
    else:
        (tmp_path / planted).write_bytes(pickle.dumps(RunsCode(marker)))
    worker.shutdown()  # the resumed worker below joins a fresh process group

    with pytest.raises(CheckpointError, match=f"^{tmp_path / planted}: .*posix.system"):
        new_worker(
            make_config(tiny[0]),
            weights_path=str(tmp_path / "weights"),
            optimizer_path=str(tmp_path / "optimizer"),
        )
    assert not marker.exists()


def test_hf_export_loads_with_transformers_and_gives_the_same_logprobs(worker, tmp_path):
    data = make_batch(seed=6)
    worker.train(data, token_nll_loss, TRAIN_MBS)
    expected = worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"]

    worker.export_hf(str(tmp_path / "hf"))

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(naive_logprobs(exported, data), expected, atol=1e-5, rtol=0)
    # Same parameters bit for bit, hence the same logits at every position and vocabulary entry.
    torch.testing.assert_close(
        dict(exported.named_parameters()), _parameters(worker), atol=0, rtol=0
    )
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    # The export names no rl_toolkit attention: it loads where rl_toolkit is not installed.
    assert "rl_toolkit" not in (tmp_path / "hf" / "config.json").read_text()


def test_tied_embeddings_train_and_export(tmp_path):
    hf_model = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    worker = new_worker(make_config(tmp_path / "tied"))
    data = make_batch(seed=7)
    torch.testing.assert_close(
        worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"],
        naive_logprobs(hf_model, data),
        atol=1e-5,
        rtol=0,
    )
    worker.train(data, token_nll_loss, TRAIN_MBS)
    worker.export_hf(str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(
        naive_logprobs(exported, data),
        worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"],
        atol=1e-5,
        rtol=0,
    )
    worker.shutdown()


def test_random_init_is_seeded_and_missing_weights_are_an_error(tmp_path):
    save_tiny_llama(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()  # config only
    config = make_config(tmp_path / "model")
    with pytest.raises(ValueError, match="random_init"):
        new_worker(config)

    config["random_init"] = True
    first = _parameters(new_worker(config))
    second_worker = new_worker(config)
    for name, value in _parameters(second_worker).items():
        assert torch.equal(value, first[name]), name
    second_worker.shutdown()


def test_warmup_then_constant_schedule(tiny):
    scheduler = [
        {
            "name": "torch.optim.lr_scheduler.LinearLR",
            "kwargs": {"start_factor": 0.25, "end_factor": 1.0, "total_iters": 2},
        },
        {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {"factor": 1.0}},
        {"milestones": [2]},
    ]
    worker = new_worker(make_config(tiny[0], scheduler=scheduler))
    data = make_batch(seed=8)
    lrs = [worker.train(data, token_nll_loss, TRAIN_MBS)["lr"] for _ in range(4)]
    assert lrs == pytest.approx([2.5e-3, 6.25e-3, 1e-2, 1e-2])
    worker.shutdown()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"precision": "bfloat16"}, "bfloat16 needs a GPU"),
        (
            {
                "fsdp": {
                    "activation_checkpointing": False,
                    "cpu_offload": True,
                    "reshard_after_forward": True,
                }
            },
            "cpu_offload: true needs a GPU",
        ),
        ({"optimizer": {"name": "torch.optim.NoSuchOpt", "kwargs": {}}}, "policy.optimizer.name"),
        (
            {"optimizer": {"name": "torch.optim.SGD", "kwargs": {"lr": 0.1, "betas": [0.9, 0.9]}}},
            "policy.optimizer.kwargs do not fit torch.optim.SGD",
        ),
        (
            {
                "scheduler": [
                    {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {}},
                    {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {}},
                ]
            },
            "milestones",
        ),
        ({"scheduler": [{"nme": "torch.optim.lr_scheduler.ConstantLR"}]}, r"scheduler\[0\]"),
        ({"attn_implementation": "flash"}, "policy.attn_implementation='flash'"),
    ],
)
def test_config_mistakes_are_value_errors(tiny, overrides, message):
    if ("precision" in overrides or "fsdp" in overrides) and torch.cuda.is_available():
        pytest.skip("valid on a GPU machine")
    with pytest.raises(ValueError, match=message):
        new_worker(make_config(tiny[0], **overrides))


def test_row_micro_batches_never_split_a_pair(worker):
    # The driver checks the configured sizes in one line (test_config_checks.py); here a size
    # that would split a pair is a bug.
    data = make_batch(seed=9)
    with pytest.raises(AssertionError, match="3 rows split a group"):
        worker.train(data, token_nll_loss, MicroBatches(packed=False, size=3))


@pytest.mark.parametrize("packing", [False, True])  # True: the varlen boundaries reach recompute
def test_activation_checkpointing_gives_the_same_step(tiny, packing):
    data = make_batch(seed=10)
    results = []
    for checkpointing in (False, True):
        fsdp = {
            "activation_checkpointing": checkpointing,
            "cpu_offload": False,
            "reshard_after_forward": True,
        }
        worker = new_worker(make_config(tiny[0], fsdp=fsdp))
        assert worker.model.causal_lm.is_activation_checkpointing == checkpointing
        worker.train(data, token_nll_loss, PACKED_TRAIN_MBS if packing else TRAIN_MBS)
        results.append(_parameters(worker))
        worker.shutdown()
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=0)


def _naive_entropy(model: torch.nn.Module, data) -> torch.Tensor:
    """``[N, T]``: at position t the entropy of the full-vocabulary distribution over token t."""
    input_ids, lengths = data["input_ids"], data["input_lengths"]
    positions = torch.arange(input_ids.shape[1])[None, :]
    with torch.no_grad():
        logits = model(input_ids, attention_mask=(positions < lengths[:, None]).long()).logits
    logprobs = torch.log_softmax(logits.float(), -1)[:, :-1]
    return torch.nn.functional.pad(-(logprobs.exp() * logprobs).sum(-1), (1, 0))


def test_entropy_bonus_step_is_the_same_for_any_micro_batch_split(tiny):
    data = make_batch(seed=12)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, 1.0, 1.0])
    data["advantages"] = advantages[:, None] * data["token_mask"]  # (N, T)
    loss_fn = ClippedPGLossFn(pg_loss_config(entropy_coef=0.1))
    mask = data["token_mask"] * data["sample_mask"][:, None]
    expected_entropy = (_naive_entropy(tiny[1], data) * mask).sum() / mask.sum()
    # lr 1e-3: Adam moves a ~0 gradient element by ~lr whatever its rounding (see the SFT
    # invariance test).
    optimizer = {"name": "torch.optim.AdamW", "kwargs": {"lr": 1.0e-3, "weight_decay": 0.0}}
    metrics, weights = [], []
    # One micro-batch of 8 rows, two of 4, and packed rows of at most 24 tokens.
    for micro_batches in (
        MicroBatches(packed=False, size=8),
        MicroBatches(packed=False, size=4),
        PACKED_TRAIN_MBS,
    ):
        worker = new_worker(make_config(tiny[0], optimizer=optimizer))
        metrics.append(worker.train(copy.deepcopy(data), loss_fn, micro_batches))
        weights.append(_parameters(worker))
        worker.shutdown()

    # The loss and metric are those of the initial weights (the loss runs before the step); on
    # policy the ratio is 1: L = -mean(A) - 0.1 * mean(H) over the generated tokens.
    assert metrics[0]["entropy"] == pytest.approx(expected_entropy.item(), rel=1e-5)
    expected_loss = -(data["advantages"] * mask).sum() / mask.sum() - 0.1 * expected_entropy
    assert metrics[0]["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    for other, other_weights in zip(metrics[1:], weights[1:], strict=True):
        for key in ("loss", "entropy", "grad_norm"):
            assert other[key] == pytest.approx(metrics[0][key], abs=1e-6), key
        torch.testing.assert_close(other_weights, weights[0], atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packing", [False, True])  # True: the flash varlen kernel
def test_bf16_nccl_worker_on_gpu(tiny, tmp_path, packing):
    path, hf_model = tiny
    worker = new_worker(make_config(path, precision="bfloat16"))
    train_mbs = PACKED_TRAIN_MBS if packing else TRAIN_MBS
    logprob_mbs = PACKED_LOGPROB_MBS if packing else LOGPROB_MBS
    assert worker.device.type == "cuda"
    data = make_batch(seed=11)
    logprobs = worker.logprobs(data, logprob_mbs, response_only=False)["logprobs"]
    torch.testing.assert_close(logprobs, naive_logprobs(hf_model, data), atol=0.1, rtol=0)
    metrics = worker.train(data, token_nll_loss, train_mbs)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0

    # A colocated vLLM engine's refit moves the optimizer state to host memory; train brings it
    # back (the fused AdamW step needs it on the GPU).
    def state_devices() -> list[str]:
        state = worker.optimizer.state.values()
        return [v.device.type for s in state for v in s.values() if torch.is_tensor(v)]

    devices = state_devices()  # exp_avg and exp_avg_sq on the GPU (AdamW's step may be on host)
    worker.offload_optimizer_state()
    assert "cuda" in devices and set(state_devices()) == {"cpu"}
    worker.reference_logprobs(data, logprob_mbs, response_only=True)
    worker.train(data, token_nll_loss, train_mbs)
    assert state_devices() == devices
    worker.export_hf(str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert exported.dtype == torch.bfloat16
    worker.shutdown()


def test_dpo_loss_starts_at_log2_and_falls(worker):
    loss_fn = DPOLossFn(
        {
            "reference_policy_kl_penalty": 0.5,
            "preference_loss_weight": 1.0,
            "sft_loss_weight": 0.0,
            "preference_average_log_probs": False,
            "sft_average_log_probs": False,
            "loss_type": "sigmoid",
            "label_smoothing": 0.0,
            "reference_free": False,
            "simpo_gamma": 0.0,
            "discopop_tau": 0.05,
        }
    )
    data = make_batch(seed=12)
    reference = worker.reference_logprobs(data, LOGPROB_MBS, response_only=True)[
        "reference_logprobs"
    ]
    data["reference_policy_logprobs"] = reference

    losses = [worker.train(data, loss_fn, TRAIN_MBS)["loss"] for _ in range(4)]

    # The policy starts as the reference: every margin is 0 and the loss -log sigmoid(0).
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0]


def test_the_schema_accepts_a_full_policy_config(tiny):
    config = make_config(tiny[0], max_grad_norm=None)
    config["scheduler"] = [
        {"name": "torch.optim.lr_scheduler.LinearLR", "kwargs": {"total_iters": 2}},
        {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {}},
        {"milestones": [2]},
    ]
    validate_config(config, PolicyConfig, {})


def test_worker_module_does_not_import_ray():
    import ast
    import inspect

    import rl_toolkit.models.policy.worker as worker_module

    tree = ast.parse(inspect.getsource(worker_module))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name == "ray" or name.startswith("ray.") for name in imported)
