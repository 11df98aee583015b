"""Built-in modules over the toolkit's workers, so the engines run from a config alone.

    PolicyInference    generation (backend hf: the worker samples): prompts -> G completions
    PolicyReference    reference log-probs; builds the dataset for DPO
    PolicyTrainer      the DPO or GRPO step (the config's `dpo` or `grpo` + `loss_fn` section)
    RuleReward         a rule-based reward function (the config's `env` section)

Each model module holds one `PolicyWorker` (FSDP2 shard, the same code as the recipes), built
from the config's `policy` section, so an engine run computes what `dpo_train` or `grpo_train`
compute for the same config. Subclass them to change a step; write a `TorchModule` for models of
your own.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import datasets
import torch
from torch.utils.data import Dataset

from rl_toolkit.config_schema import (
    GRPOMasterConfig,
    MasterConfig,
    check_grpo_config,
    check_master_config,
    micro_batches,
)
from rl_toolkit.data import repeat_prompts, tokenize_preference_dataset, tokenize_prompt_dataset
from rl_toolkit.data.collate import completion_texts, preference_collate_fn, prompt_collate_fn
from rl_toolkit.data.interfaces import TaskDataSpec
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.engine.engine import check_sections
from rl_toolkit.engine.module import BaseModule, EngineError, TorchModule
from rl_toolkit.models.fsdp import checkpoint
from rl_toolkit.models.policy.worker import PolicyWorker
from rl_toolkit.utils.config import ConfigError
from rl_toolkit.utils.hf import get_tokenizer

# The keys a GRPO training step sends to the policy worker (grpo.py's _TRAIN_KEYS).
_GRPO_TRAIN_KEYS = (
    "input_ids", "input_lengths", "token_mask", "sample_mask", "advantages",
    "generation_logprobs", "reference_policy_logprobs", "prev_logprobs",
)  # fmt: skip


class CollatedDataset(Dataset):
    """A dataset and the `collate_fn` that batches its items (what the engine loads)."""

    def __init__(self, items: Any, collate_fn: Any) -> None:
        self.items = items
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def preference_dataset(prompts: Any, tokenizer: Any, config: Any) -> Dataset:
    """Preference rows (`prompt`, `chosen_response`, `rejected_response`) tokenised and batched
    as `run_dpo.py` does (the config's `data` and `policy` sections): a module's build_dataset."""
    pairs = tokenize_preference_dataset(
        _rows(prompts),
        tokenizer,
        TaskDataSpec(task_name="engine"),
        config["data"],
        max_total_sequence_length=config["policy"]["max_total_sequence_length"],
    )
    collate = partial(
        preference_collate_fn,
        pad_token_id=tokenizer.pad_token_id,
        pad_to_multiple_of=config["data"]["pad_to_multiple_of"],
    )
    return CollatedDataset(pairs, collate)


def _rows(prompts: Any) -> datasets.Dataset:
    """What `engine.set_dataset` got, as a datasets.Dataset: a split of one, or a list of rows."""
    if isinstance(prompts, datasets.Dataset):
        return prompts
    return datasets.Dataset.from_list([dict(row) for row in prompts])


def _algorithm(config: Any) -> str:
    for name in ("dpo", "grpo"):
        if name in config:
            return name
    raise ConfigError(
        "the built-in modules need a `dpo` or a `grpo` section in the config "
        "(configs/engine_dpo.yaml, configs/engine_grpo.yaml)"
    )


def check_builtin_config(config: Any) -> None:
    """The recipe sections the built-in modules read, checked as `run_dpo.py` / `run_grpo.py`
    check them, plus the engine's runtime against them. Raises ConfigError (one line)."""
    algorithm = _algorithm(config)
    runtime, policy = config["runtime"], config["policy"]
    if algorithm == "dpo":
        check_sections(config, MasterConfig)
        check_master_config(config)
        from rl_toolkit.algorithms.loss_functions import validate_dpo_loss_config

        validate_dpo_loss_config(config["dpo"])
    else:
        check_sections(config, GRPOMasterConfig)
        check_grpo_config(config)
        grpo = config["grpo"]
        unsupported = {
            "grpo.dynamic_sampling.enabled": grpo["dynamic_sampling"]["enabled"],
            "grpo.sft_warmup_steps": grpo["sft_warmup_steps"] > 0,
            "policy.generation.backend=vllm": policy["generation"]["backend"] == "vllm",
        }
        for key, used in unsupported.items():
            if used:
                raise ConfigError(
                    f"{key}: not supported by the engine's built-in modules; use "
                    "examples/run_grpo.py, or turn it off"
                )
    if runtime["train_global_batch_size"] != policy["train_global_batch_size"]:
        raise ConfigError(
            f"runtime.train_global_batch_size={runtime['train_global_batch_size']} must equal "
            f"policy.train_global_batch_size={policy['train_global_batch_size']} (the built-in "
            "trainer steps on the engine's global batches)"
        )


class _PolicyModule(TorchModule):
    """A module holding one PolicyWorker built from the config's `policy` section."""

    init_optimizer = False

    def check_args(self) -> None:
        check_builtin_config(self.global_args)
        workers = self.global_args["models"][self.name]["num_workers"]
        cluster = self.global_args["cluster"]
        if workers != cluster["gpus_per_node"] * cluster["num_nodes"]:
            raise ConfigError(
                f"models.{self.name}.num_workers={workers} must equal cluster.gpus_per_node x "
                f"cluster.num_nodes={cluster['gpus_per_node'] * cluster['num_nodes']}, which "
                "the policy section's batch sizes are checked against"
            )

    def setup(self) -> None:
        policy = self.global_args["policy"]
        self.tokenizer = get_tokenizer(policy["tokenizer"])
        self.worker = PolicyWorker(
            config=policy,
            tokenizer=self.tokenizer,
            init_optimizer=self.init_optimizer,
            init_reference_model=False,
        )
        self.model = self.worker.hf_model
        self.pad_values = {"input_ids": self.tokenizer.pad_token_id}
        self.logprob_mbs = micro_batches(policy["micro_batch"], "logprob")

    def save_checkpoint(self, path: str) -> None:
        self.worker.save_checkpoint(f"{path}/weights")

    def load_checkpoint(self, path: str) -> None:
        checkpoint.load_model(self.worker.hf_model, f"{path}/weights")


class PolicyReference(_PolicyModule):
    """The reference policy (the initial weights): `reference_policy_logprobs` of the response
    tokens. Without a KL term in a GRPO config it adds nothing. Builds the DPO dataset from
    preference rows (`prompt`, `chosen_response`, `rejected_response`)."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        config = self.global_args
        if "loss_fn" in config and config["loss_fn"]["reference_policy_kl_penalty"] == 0:
            return {}
        logprobs = self.worker.logprobs(as_rows(data), self.logprob_mbs, response_only=True)
        return {"reference_policy_logprobs": logprobs["logprobs"]}

    def build_dataset(self, prompts: Any, is_eval: bool = False) -> Dataset:
        if _algorithm(self.global_args) != "dpo":
            raise EngineError(f"{self.name}: PolicyReference builds DPO data (a `dpo` config)")
        return preference_dataset(prompts, self.tokenizer, self.global_args)


class PolicyInference(_PolicyModule):
    """The policy that generates: `grpo.num_generations_per_prompt` completions of each prompt
    (the rollout keys of docs/design.md), sampled by the worker (backend hf), seeded per
    (seed, episode, prompt, sample). Its weights come from the trainer after each episode.
    Builds the prompt dataset (rows with `prompt` and the metadata columns)."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        grpo = self.global_args["grpo"]
        prompts = repeat_prompts(as_rows(data), grpo["num_generations_per_prompt"])
        rollout = self.worker.generate(prompts, step=iteration, greedy=False)
        runtime = self.global_args["runtime"]
        rows_per_episode = runtime["sample_per_episode"] * grpo["num_generations_per_prompt"]
        if rows_per_episode > runtime["train_global_batch_size"]:
            # Several optimizer steps per episode: the ratio's denominator is this policy.
            logprobs = self.worker.logprobs(rollout, self.logprob_mbs, response_only=False)
            rollout["prev_logprobs"] = logprobs["logprobs"] * rollout["token_mask"]
        return rollout

    def eval_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        """`grpo.val_num_generations` completions of each evaluation prompt (greedy for one),
        seeded apart from training's."""
        k = self.global_args["grpo"]["val_num_generations"]
        prompts = repeat_prompts(as_rows(data), k)
        return self.worker.generate(prompts, step=-1 - iteration, greedy=k == 1)

    def build_dataset(self, prompts: Any, is_eval: bool = False) -> Dataset:
        config = self.global_args
        policy = config["policy"]
        tokenized = tokenize_prompt_dataset(
            _rows(prompts),
            self.tokenizer,
            TaskDataSpec(task_name="engine"),
            config["data"],
            max_prompt_length=policy["max_total_sequence_length"]
            - policy["generation"]["max_new_tokens"],
        )
        return CollatedDataset(
            tokenized, partial(prompt_collate_fn, pad_token_id=self.tokenizer.pad_token_id)
        )


class PolicyTrainer(_PolicyModule):
    """The trained policy: one optimizer step per `train_step` with the recipe's loss (DPO's
    `DPOLossFn`, or GRPO's advantages and `ClippedPGLossFn`). Its checkpoints hold the optimizer
    too (and an HF export with `checkpointing.save_hf`)."""

    init_optimizer = True

    def setup(self) -> None:
        super().setup()
        config = self.global_args
        if _algorithm(config) == "dpo":
            from rl_toolkit.algorithms.loss_functions import DPOLossFn

            self.loss_fn: Any = DPOLossFn(config["dpo"])
        else:
            from rl_toolkit.algorithms.loss_functions import ClippedPGLossFn

            self.loss_fn = ClippedPGLossFn(config["loss_fn"])
        self.train_mbs = micro_batches(config["policy"]["micro_batch"], "train")

    def train_step(self, data: list[dict[str, Any]], iteration: int) -> dict[str, float]:
        shard = BatchedDataDict.from_batches([as_rows(micro) for micro in data])
        if _algorithm(self.global_args) == "grpo":
            shard = self._grpo_batch(shard)
        return self.worker.train(shard, self.loss_fn, self.train_mbs)

    def _grpo_batch(self, rollout: BatchedDataDict) -> BatchedDataDict:
        """Advantages per group (groups are whole on every rank) and the keys the loss reads."""
        from rl_toolkit.algorithms.grpo import compute_advantages

        config = self.global_args
        rollout["advantages"] = compute_advantages(rollout, cast(GRPOMasterConfig, config))
        if config["grpo"]["overlong_filtering"]:
            rollout["sample_mask"] = rollout["sample_mask"] * (~rollout["truncated"]).float()
        keys = [key for key in _GRPO_TRAIN_KEYS if key in rollout]
        return BatchedDataDict({k: rollout[k] for k in keys}, group_size=rollout.group_size)

    def eval_step(self, data: dict[str, Any]) -> dict[str, Any]:
        """The loss and metrics of an evaluation batch (DPO), one value per row."""
        batch = as_rows(data)
        metrics = self.worker.evaluate(batch, self.loss_fn, self.logprob_mbs)
        return {
            key: torch.full((batch.size,), float(value))
            for key, value in metrics.items()
            if not key.startswith(("num_", "global_"))
        }

    def save_checkpoint(self, path: str) -> None:
        self.worker.save_checkpoint(
            f"{path}/weights",
            optimizer_path=f"{path}/optimizer",
            tokenizer_path=f"{path}/tokenizer",
        )
        if self.global_args["checkpointing"]["save_hf"]:
            self.worker.export_hf(f"{path}/hf")

    def load_checkpoint(self, path: str) -> None:
        worker = self.worker
        checkpoint.load_model(worker.hf_model, f"{path}/weights")
        assert worker.optimizer is not None and worker.scheduler is not None, "a trainer"
        checkpoint.load_optimizer(
            worker.hf_model, worker.optimizer, worker.scheduler, f"{path}/optimizer"
        )


class RuleReward(BaseModule):
    """A rule-based reward: the config's `env` section (a reward function of the toolkit or a
    user's, in a pool of processes with a timeout); adds `rewards` [N] to the completions."""

    def check_args(self) -> None:
        from rl_toolkit.environments.reward_fn import load_reward_fn

        env = self.global_args["env"]
        load_reward_fn(env["name"], env["kwargs"])

    def setup(self) -> None:
        from rl_toolkit.environments.worker import EnvironmentWorker

        self.environment = EnvironmentWorker(self.global_args["env"])
        self.tokenizer = get_tokenizer(self.global_args["policy"]["tokenizer"])

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        batch = as_rows(data)
        if batch.size == 0:
            return {}
        result = self.environment.score(
            batch["prompts"], completion_texts(batch, self.tokenizer), batch["metadata"]
        )
        rewards = torch.tensor(result.rewards, dtype=torch.float32)
        # Averaged over the ranks' equal shards by the engine: the episode's mean reward.
        self.add_metrics({"reward": rewards.mean().item()})
        self.add_metrics({f"env/{k}": v for k, v in result.metrics.items()})
        return {"rewards": rewards}


def dataset_rows(config: Any, split: str = "train") -> datasets.Dataset:
    """The rows of the config's `data` section for `engine.set_dataset`: preference pairs for a
    `dpo` config, prompts for a `grpo` config; `split` is "train" or "validation"."""
    if _algorithm(config) == "dpo":
        from rl_toolkit.data import load_preference_dataset

        return load_preference_dataset(config["data"]).formatted_ds[split]
    from rl_toolkit.data import PromptDataset

    return PromptDataset(config["data"]).formatted_ds[split]


def as_rows(data: Any) -> BatchedDataDict:
    """A step's data as a BatchedDataDict (it is one when the engine sent it)."""
    if isinstance(data, BatchedDataDict):
        return data
    return BatchedDataDict(dict(data))
