"""LoRA (policy.lora) on the plain policy worker in this process (world size 1, gloo): the start
at the base model, the reference as the adapters off, checkpoints, exports, the refit, packing
and activation checkpointing, and the config checks. Two workers: test_lora_distributed.py."""

import json
import math
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl_toolkit.algorithms import dpo
from rl_toolkit.algorithms.loss_functions import DPOLossFn
from rl_toolkit.config_schema import (
    GRPOMasterConfig,
    MasterConfig,
    MicroBatches,
    SFTMasterConfig,
    check_master_config,
    micro_batches,
    resolve_local_paths,
)
from rl_toolkit.data import load_preference_dataset, tokenize_preference_dataset
from rl_toolkit.distributed import virtual_cluster
from rl_toolkit.models.generation.vllm_generation import VllmGeneration
from rl_toolkit.models.lora import check_lora_config
from rl_toolkit.models.policy.worker import PolicyWorker
from rl_toolkit.utils.config import ConfigError, load_config, run_cli_with_config
from rl_toolkit.utils.hf import get_tokenizer
from rl_toolkit.utils.safe_load import read_dcp_metadata
from tests.unit.policy_testing import (
    LOGPROB_MBS,
    PACKED_TRAIN_MBS,
    PAD_ID,
    TRAIN_MBS,
    make_batch,
    make_config,
    naive_logprobs,
    new_worker,
    token_nll_loss,
)
from tests.unit.test_policy_generation import prompt_batch, sampling_config
from tests.unit.test_vllm_worker import LocalGroup, fake_worker, vllm_policy_config

REPO = Path(__file__).resolve().parents[2]
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def lora_config(model_dir: Path, **overrides) -> dict:
    return make_config(model_dir, lora=dict(LORA), **overrides)


def _parameters(worker: PolicyWorker) -> dict[str, torch.Tensor]:
    return {
        name: param.full_tensor().detach().clone()
        for name, param in worker.hf_model.named_parameters()
    }


def test_zero_init_b_starts_at_the_base_model_and_the_reference_stays_there(tiny) -> None:
    path, base = tiny
    worker = new_worker(lora_config(path))
    data = make_batch(seed=1)
    expected = naive_logprobs(base, data)
    trained = {name for name, p in worker.hf_model.named_parameters() if p.requires_grad}
    # Only the adapters train: 2 layers x 7 linear layers x (A, B); no reference copy exists.
    assert len(trained) == 28 and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert sum(len(group["params"]) for group in worker.optimizer.param_groups) == 28
    assert worker.reference is None
    initial = _parameters(worker)
    assert all(not initial[n].any() for n in trained if ".lora_B." in n)

    torch.testing.assert_close(
        worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"],
        expected,
        atol=1e-5,
        rtol=0,
    )
    for _ in range(3):
        worker.train(data, token_nll_loss, TRAIN_MBS)

    after = _parameters(worker)
    assert all(torch.equal(after[n], initial[n]) for n in initial if n not in trained)
    policy = worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"]
    assert (policy - expected).abs().max() > 1e-2  # the adapters moved the policy
    reference = worker.reference_logprobs(data, LOGPROB_MBS, response_only=True)
    torch.testing.assert_close(
        reference["reference_logprobs"], expected * data["token_mask"], atol=1e-5, rtol=0
    )
    worker.shutdown()


def test_lora_dropout_is_kept_for_training_and_sampling_uses_the_adapters(tiny) -> None:
    # The model's own dropout is off (as without LoRA); the adapters' is the user's choice and
    # applies in training forwards only.
    config = make_config(tiny[0], lora=LORA | {"dropout": 0.5}, generation=sampling_config())
    worker = new_worker(config)
    dropouts = {
        name: module.p
        for name, module in worker.model.named_modules()
        if isinstance(module, torch.nn.Dropout)
    }
    assert dropouts and all(
        p == (0.5 if ".lora_dropout." in name else 0.0) for name, p in dropouts.items()
    )
    data = make_batch(seed=7)
    for _ in range(3):
        worker.train(data, token_nll_loss, TRAIN_MBS)
    first, second = (
        worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"] for _ in range(2)
    )
    assert torch.equal(first, second)  # no dropout outside training
    # Backend hf samples with the adapters on: a rollout's log-probs are the trained policy's.
    rollout = worker.generate(prompt_batch([3, 5, 4]), step=0, greedy=False)
    scored = worker.logprobs(rollout, LOGPROB_MBS, response_only=True)["logprobs"]
    torch.testing.assert_close(rollout["generation_logprobs"], scored, atol=1e-5, rtol=0)
    base = worker.reference_logprobs(rollout, LOGPROB_MBS, response_only=True)
    assert (base["reference_logprobs"] - scored).abs().max() > 1e-2
    worker.shutdown()


def test_packing_and_activation_checkpointing_give_the_same_lora_step(tiny) -> None:
    data = make_batch(seed=2)
    results = []
    for checkpointing, split in (
        (False, MicroBatches(packed=False, size=8)),
        (True, TRAIN_MBS),
        (True, PACKED_TRAIN_MBS),  # varlen attention over packed rows, recomputed in backward
    ):
        fsdp = {
            "activation_checkpointing": checkpointing,
            "cpu_offload": False,
            "reshard_after_forward": True,
        }
        worker = new_worker(lora_config(tiny[0], fsdp=fsdp))
        metrics = worker.train(data, token_nll_loss, split)
        results.append((metrics, _parameters(worker)))
        worker.shutdown()
    (expected, expected_weights), *others = results
    for metrics, weights in others:
        for key in ("loss", "grad_norm"):
            assert metrics[key] == pytest.approx(expected[key], abs=1e-6), key
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=0)


def test_a_checkpoint_holds_the_adapters_and_resumes_bit_identically(tiny, tmp_path) -> None:
    worker = new_worker(lora_config(tiny[0]))
    data, next_data = make_batch(seed=3), make_batch(seed=4)
    for _ in range(2):
        worker.train(data, token_nll_loss, TRAIN_MBS)
    worker.save_checkpoint(str(tmp_path / "weights"), str(tmp_path / "optimizer"))
    saved = read_dcp_metadata(tmp_path / "weights" / ".metadata").state_dict_metadata
    assert len(saved) == 28 and all(".lora_" in name for name in saved)

    resumed = new_worker(
        lora_config(tiny[0]),
        weights_path=str(tmp_path / "weights"),
        optimizer_path=str(tmp_path / "optimizer"),
    )
    assert resumed.train(next_data, token_nll_loss, TRAIN_MBS) == worker.train(
        next_data, token_nll_loss, TRAIN_MBS
    )
    after, resumed_after = _parameters(worker), _parameters(resumed)
    assert all(torch.equal(resumed_after[name], value) for name, value in after.items())
    worker.shutdown()


def test_both_exports_load_and_give_the_training_logprobs(tiny, tmp_path) -> None:
    path, _ = tiny
    worker = new_worker(lora_config(path))
    data = make_batch(seed=5)
    for _ in range(2):
        worker.train(data, token_nll_loss, TRAIN_MBS)
    expected = worker.logprobs(data, LOGPROB_MBS, response_only=False)["logprobs"]
    worker.export_hf(str(tmp_path / "adapter"), export_lora="adapter")
    worker.export_hf(str(tmp_path / "merged"), export_lora="merged")
    worker.shutdown()

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(path)
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_adapter = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter"
    ).eval()
    for model in (merged, with_adapter, peft_model):
        torch.testing.assert_close(naive_logprobs(model, data), expected, atol=1e-5, rtol=0)
    # Our merge is peft's: the merged export's weights are those of peft's merge_and_unload.
    peft_merged = peft_model.merge_and_unload().state_dict()
    exported = load_file(tmp_path / "merged" / "model.safetensors")
    assert exported.keys() == peft_merged.keys()
    torch.testing.assert_close(exported, peft_merged, atol=1e-6, rtol=0)


def test_a_refit_sends_the_merged_weights_under_the_base_models_names(tiny, tmp_path) -> None:
    config = vllm_policy_config(tiny[0]) | {"lora": dict(LORA)}
    policy_worker = new_worker(config)
    policy_worker.train(make_batch(seed=6), token_nll_loss, TRAIN_MBS)
    engine_worker = fake_worker(config, tiny[1])
    generation = VllmGeneration(
        LocalGroup([engine_worker]), config, pad_token_id=PAD_ID, transport="object"
    )
    try:
        generation.finish_generation()
        generation.update_weights(SimpleNamespace(workers=LocalGroup([policy_worker])))
        policy_worker.export_hf(str(tmp_path / "merged"), export_lora="merged")
    finally:
        policy_worker.shutdown()
    loaded = engine_worker.engine.llm.loaded
    assert list(loaded) == list(tiny[1].state_dict())  # the plain model's names, in order
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in merged.items())
    assert not torch.equal(
        loaded["model.layers.0.mlp.up_proj.weight"],
        tiny[1].state_dict()["model.layers.0.mlp.up_proj.weight"],
    )


# ---------------------------------------------------------------------------------------------
# Config checks: one line each, before any worker starts


def tiny_dpo(*overrides: str) -> MasterConfig:
    return load_config(REPO / "configs" / "dpo_tiny.yaml", overrides, schema=MasterConfig)


LORA_OVERRIDE = "policy.lora={rank: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_a_bad_lora_config_is_one_line() -> None:
    config = tiny_dpo(LORA_OVERRIDE.replace("v_proj", "v_prj"))
    config["policy"]["model_name"] = str(REPO / "assets" / "tiny_llama")
    with pytest.raises(ConfigError) as error:
        check_lora_config(config["policy"])
    assert one_line(error).startswith("policy.lora.target_modules: 'v_prj' names no linear layer")
    assert "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in (
        str(error.value)
    )
    config["policy"]["lora"]["target_modules"] = ["lm_head"]
    with pytest.raises(ConfigError) as error:
        check_lora_config(config["policy"])
    assert "'lm_head' is the output layer" in one_line(error)
    config["policy"]["lora"]["target_modules"] = ["self_attn.q_proj", "mlp.up_proj"]
    check_lora_config(config["policy"])  # dotted suffixes match, as in peft

    with pytest.raises(ConfigError) as error:
        check_master_config(tiny_dpo(LORA_OVERRIDE, "dpo.sync_ref_model=true"))
    assert "with policy.lora the reference is the base model" in one_line(error)
    with pytest.raises(ConfigError) as error:
        check_master_config(tiny_dpo(LORA_OVERRIDE, "checkpointing.save_hf=true"))
    assert "set checkpointing.export_lora=merged" in one_line(error)
    check_master_config(
        tiny_dpo(LORA_OVERRIDE, "checkpointing.save_hf=true", "checkpointing.export_lora=merged")
    )


# ---------------------------------------------------------------------------------------------
# DPO with LoRA on the embedded default


class InProcessPolicy:
    """The Policy facade's calls that dpo.validate and add_ref_logprobs_to_data make, on one
    worker in this process."""

    def __init__(self, worker: PolicyWorker) -> None:
        self.worker = worker
        self.evaluate = worker.evaluate
        self.train = worker.train

    def reference_logprobs(self, data, micro_batches) -> dict:
        return self.worker.reference_logprobs(data, micro_batches, response_only=True)


def test_a_few_lora_dpo_steps_on_the_embedded_default_learn() -> None:
    # configs/dpo_tiny.yaml with adapters on every linear layer; LoRA takes a larger rate than
    # full fine-tuning (10x the tiny default's), without the warm-up, to learn in four steps.
    config = tiny_dpo(
        "policy.lora={rank: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}",
        "policy.optimizer.kwargs.lr=1.0e-2",
        "policy.scheduler=[{name: torch.optim.lr_scheduler.ConstantLR, kwargs: {factor: 1.0}}]",
        "cluster.gpus_per_node=1",
    )
    resolve_local_paths(config)
    tokenizer = get_tokenizer(config["policy"]["tokenizer"])
    dataset = load_preference_dataset(config["data"])
    train, val = (
        tokenize_preference_dataset(
            dataset.formatted_ds[split], tokenizer, dataset.task_spec, config["data"],
            max_total_sequence_length=config["policy"]["max_total_sequence_length"],
        )
        for split in ("train", "validation")
    )  # fmt: skip
    train_dl, val_dl = dpo._build_dataloaders(config, tokenizer, train, val)
    worker = PolicyWorker(
        config=config["policy"], tokenizer=tokenizer, init_optimizer=True, init_reference_model=True
    )
    policy = InProcessPolicy(worker)
    loss_fn = DPOLossFn(config["dpo"])
    policy_mbs = config["policy"]["micro_batch"]

    def validate() -> dict[str, float]:
        return dpo.validate(
            policy, val_dl, tokenizer, loss_fn, 0, config, val_batches=1,
            val_batch_size=config["dpo"]["val_global_batch_size"],
            val_mbs=micro_batches(policy_mbs, "logprob"),
        )  # fmt: skip

    before = validate()
    batches = dpo.add_ref_logprobs_to_data(train_dl, policy, config)
    metrics = [policy.train(next(batches), loss_fn, micro_batches(policy_mbs, "train"))
              for _ in range(4)]  # fmt: skip
    after = validate()
    worker.shutdown()

    # Zero-initialised B: every pair starts with the reference's log-probs, margin 0.
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["accuracy"] == 0
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert after["loss"] < math.log(2) - 0.02 and after["accuracy"] > 0.6


@pytest.mark.parametrize("script", ["run_dpo", "run_sft", "run_grpo"])
@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (
            "{rank: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, qkv_proj]}",
            "error: policy.lora.target_modules: 'qkv_proj' names no linear layer of ",
        ),
        (
            "{rank: 0, alpha: 8, dropout: 0.0, target_modules: all-linear}",
            "error: Invalid config: 'policy.lora.rank': input should be greater than or equal to 1",
        ),
    ],
    ids=["unknown_target", "rank_0"],
)
def test_each_script_exits_2_in_one_line_on_a_bad_lora_config_before_ray(
    script, lora, message, monkeypatch, capsys
) -> None:
    def no_ray(*args, **kwargs) -> None:
        raise AssertionError("Ray started before the config was checked")

    monkeypatch.setattr(virtual_cluster, "init_ray", no_ray)
    entry = runpy.run_path(str(REPO / "examples" / f"{script}.py"))  # its main and check
    schema = {"run_dpo": MasterConfig, "run_sft": SFTMasterConfig, "run_grpo": GRPOMasterConfig}
    with pytest.raises(SystemExit) as exit:
        run_cli_with_config(
            entry["main"], [f"policy.lora={lora}"], entry["EMBEDDED_DEFAULT"], "", schema[script],
            check=entry["check"],
        )  # fmt: skip
    assert exit.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(message) and stderr.count("\n") == 1, stderr
