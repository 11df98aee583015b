"""Built-in modules over the toolkit's workers, so the engines run from a config alone.

    PolicyInference    generation (backend hf: the worker samples): prompts -> G completions
    PolicyReference    reference log-probs; builds the dataset for DPO
    PolicyTrainer      the DPO, GRPO or PPO policy step (the config's `dpo`, `grpo` or `ppo`
                       section and `loss_fn`)
    RuleReward         a rule-based reward function (the config's `env` section)
    ValueInference     the critic's values of the completions' tokens (PPO's `critic` section)
    ValueTrainer       the critic's step (`value_loss_fn`, `ppo.critic_epochs` passes)
    RewardInference    PPO's rewards (the `reward_model`, else the `env` reward function), then
                       per-token rewards, GAE advantages and returns

The policy modules each hold one `PolicyWorker` (FSDP2 shard, the same code as the recipes),
built from the config's `policy` section, the value modules a `ValueWorker` from `critic`, so an
engine run computes what `dpo_train`, `grpo_train` or `ppo_train` compute for the same config.
Subclass them to change a step; write a `TorchModule` for models of your own.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import datasets
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from rl_toolkit.config_schema import (
    GRPOMasterConfig,
    MasterConfig,
    PPOMasterConfig,
    check_grpo_config,
    check_master_config,
    check_ppo_config,
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
from rl_toolkit.models.value.worker import ValueWorker
from rl_toolkit.utils.config import ConfigError
from rl_toolkit.utils.hf import get_tokenizer


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
    for name in ("ppo", "dpo", "grpo"):  # ppo first: a PPO config has a `grpo` section too
        if name in config:
            return name
    raise ConfigError(
        "the built-in modules need a `dpo`, `grpo` or `ppo` section in the config "
        "(configs/engine_dpo.yaml, configs/engine_grpo.yaml, configs/engine_rlhf.yaml)"
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
        if algorithm == "ppo":
            check_sections(config, PPOMasterConfig)
            check_ppo_config(config)
            _check_critic_schedule(config)
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


def _check_critic_schedule(config: Any) -> None:
    # The engine hands both trainers the same global batches.
    critic, runtime = config["critic"], config["runtime"]
    if critic["train_global_batch_size"] != runtime["train_global_batch_size"]:
        raise ConfigError(
            f"critic.train_global_batch_size={critic['train_global_batch_size']} must equal "
            f"runtime.train_global_batch_size={runtime['train_global_batch_size']} (the "
            "built-in ValueTrainer steps on the engine's global batches)"
        )


def _check_num_workers(module: BaseModule, section: str) -> None:
    """The module's workers are the cluster's: what the section's batch sizes are checked
    against."""
    workers = module.global_args["models"][module.name]["num_workers"]
    cluster = module.global_args["cluster"]
    if workers != cluster["gpus_per_node"] * cluster["num_nodes"]:
        raise ConfigError(
            f"models.{module.name}.num_workers={workers} must equal cluster.gpus_per_node x "
            f"cluster.num_nodes={cluster['gpus_per_node'] * cluster['num_nodes']}, which "
            f"the {section} section's batch sizes are checked against"
        )


class _WorkerModule(TorchModule):
    """A module over one of the toolkit's FSDP2 workers (`self.worker`, built in `setup`): its
    checkpoints are the worker's (the weights; a trainer's optimizer and tokenizer too)."""

    init_optimizer = False
    worker: Any = None

    def save_checkpoint(self, path: str) -> None:
        if not self.init_optimizer:
            self.worker.save_checkpoint(f"{path}/weights")
            return
        self.worker.save_checkpoint(
            f"{path}/weights",
            optimizer_path=f"{path}/optimizer",
            tokenizer_path=f"{path}/tokenizer",
        )

    def load_checkpoint(self, path: str) -> None:
        worker = self.worker
        checkpoint.load_model(worker.hf_model, f"{path}/weights")
        if self.init_optimizer:
            assert worker.optimizer is not None and worker.scheduler is not None, "a trainer"
            checkpoint.load_optimizer(
                worker.hf_model, worker.optimizer, worker.scheduler, f"{path}/optimizer"
            )


class _PolicyModule(_WorkerModule):
    """A module holding one PolicyWorker built from the config's `policy` section."""

    def check_args(self) -> None:
        check_builtin_config(self.global_args)
        _check_num_workers(self, "policy")

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
    `DPOLossFn`, or `ClippedPGLossFn` on GRPO's group advantages or on the GAE advantages that
    PPO's RewardInference adds; no step in PPO's first `ppo.critic_warmup_steps` episodes). Its
    checkpoints hold the optimizer too (and an HF export with `checkpointing.save_hf`)."""

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

    # ChatLearn's second form of train_step (engine/module.py): it needs the episode.
    def train_step(  # type: ignore[override]
        self, data: list[dict[str, Any]], train_info: dict[str, int]
    ) -> dict[str, float] | None:
        shard = BatchedDataDict.from_batches([as_rows(micro) for micro in data])
        algorithm = _algorithm(self.global_args)
        if algorithm == "ppo":
            if train_info["episode"] < self.global_args["ppo"]["critic_warmup_steps"]:
                return None  # the critic's warm-up: the policy waits
            shard = _train_keys(shard)  # RewardInference added the advantages
        elif algorithm == "grpo":
            shard = self._grpo_batch(shard)
        return self.worker.train(shard, self.loss_fn, self.train_mbs)

    def _grpo_batch(self, rollout: BatchedDataDict) -> BatchedDataDict:
        """Advantages per group (groups are whole on every rank) and the keys the loss reads."""
        from rl_toolkit.algorithms.grpo import compute_advantages

        config = self.global_args
        rollout["advantages"] = compute_advantages(rollout, cast(GRPOMasterConfig, config))
        if config["grpo"]["overlong_filtering"]:
            rollout["sample_mask"] = rollout["sample_mask"] * (~rollout["truncated"]).float()
        return _train_keys(rollout)

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
        super().save_checkpoint(path)
        if self.global_args["checkpointing"]["save_hf"]:
            self.worker.export_hf(f"{path}/hf")


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
        return {"rewards": _env_rewards(self, self.environment, batch, self.tokenizer)}


def _env_rewards(
    module: BaseModule, environment: Any, batch: BatchedDataDict, tokenizer: Any
) -> torch.Tensor:
    """`[N]` rewards of the completions from an EnvironmentWorker; the mean reward and the
    environment's metrics recorded (averaged over the ranks' equal shards by the engine)."""
    result = environment.score(
        batch["prompts"], completion_texts(batch, tokenizer), batch["metadata"]
    )
    rewards = torch.tensor(result.rewards, dtype=torch.float32)
    module.add_metrics({"reward": rewards.mean().item()})
    module.add_metrics(result.metrics)  # env/timeouts, env/errors
    return rewards


class _ValueModule(_WorkerModule):
    """A module holding one ValueWorker built from the config's `critic` section (PPO)."""

    def check_args(self) -> None:
        check_builtin_config(self.global_args)
        if _algorithm(self.global_args) != "ppo":
            raise EngineError(
                f"{self.name}: {type(self).__name__} is PPO's critic; it needs a `ppo` config "
                "(configs/engine_rlhf.yaml)"
            )
        _check_num_workers(self, "critic")

    def setup(self) -> None:
        config = self.global_args
        critic = config["critic"]
        self.tokenizer = get_tokenizer(config["policy"]["tokenizer"])
        self.worker = ValueWorker(
            config=critic,
            tokenizer=self.tokenizer,
            section="critic",
            init_optimizer=self.init_optimizer,
        )
        self.model = self.worker.hf_model
        self.pad_values = {"input_ids": self.tokenizer.pad_token_id}
        self.value_mbs = micro_batches(critic["micro_batch"], "logprob")


class ValueInference(_ValueModule):
    """The critic that scores the rollout: `values` [N, T], the value of the state before each
    response token. Its weights come from the ValueTrainer after each episode."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        return {"values": self.worker.get_values(as_rows(data), self.value_mbs)["values"]}


class ValueTrainer(_ValueModule):
    """The trained critic: `ppo.critic_epochs` optimizer steps with `ValueLossFn` on each global
    batch (the rollout's `values` and RewardInference's `returns`). Its checkpoints hold the
    optimizer and tokenizer too."""

    init_optimizer = True

    def setup(self) -> None:
        super().setup()
        from rl_toolkit.algorithms.loss_functions import ValueLossFn

        self.loss_fn = ValueLossFn(self.global_args["value_loss_fn"])
        self.train_mbs = micro_batches(self.global_args["critic"]["micro_batch"], "train")

    def train_step(self, data: list[dict[str, Any]], iteration: int) -> dict[str, float]:
        from rl_toolkit.algorithms.ppo import CRITIC_KEYS, merge_critic_steps

        shard = BatchedDataDict.from_batches([as_rows(micro) for micro in data])
        batch: BatchedDataDict = BatchedDataDict(
            {k: shard[k] for k in CRITIC_KEYS}, group_size=shard.group_size
        )
        epochs = self.global_args["ppo"]["critic_epochs"]
        steps = [self.worker.train(batch, self.loss_fn, self.train_mbs) for _ in range(epochs)]
        return merge_critic_steps(steps, epochs)


class RewardInference(TorchModule):
    """PPO's reward module. It scores the completions, with the config's `reward_model` (a frozen
    sequence classifier, FSDP2 over this module's workers) or else the `env` reward function;
    given the reference's and the value model's outputs too (RLHFEngine's flow), it adds the
    per-token rewards' GAE `advantages` (whitened over the flow call's rows, on all ranks) and
    `returns`, as ppo_train computes them. On evaluation completions (no values) it scores only.
    """

    def check_args(self) -> None:
        config = self.global_args
        check_builtin_config(config)
        if _algorithm(config) != "ppo":
            raise EngineError(
                f"{self.name}: RewardInference computes PPO's advantages and needs a `ppo` "
                "config (configs/engine_rlhf.yaml); RuleReward scores GRPO's completions"
            )
        if config["reward_model"] is None:
            from rl_toolkit.environments.reward_fn import load_reward_fn

            load_reward_fn(config["env"]["name"], config["env"]["kwargs"])

    def setup(self) -> None:
        config = self.global_args
        self.tokenizer = get_tokenizer(config["policy"]["tokenizer"])
        reward_model = config["reward_model"]
        self.environment: Any = None
        if reward_model is None:
            from rl_toolkit.environments.worker import EnvironmentWorker

            self.environment = EnvironmentWorker(config["env"])
            return
        from rl_toolkit.models.reward.reward_model import reward_micro_batches
        from rl_toolkit.models.reward.worker import RewardModelWorker

        self.scorer = RewardModelWorker(config=reward_model)
        self.reward_tokenizer = get_tokenizer(reward_model["tokenizer"], section="reward_model")
        self.reward_mbs = reward_micro_batches(reward_model)

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        from rl_toolkit.algorithms.advantages import explained_variance
        from rl_toolkit.algorithms.ppo import compute_advantages

        batch = as_rows(data)
        batch["rewards"] = self._rewards(batch)
        if "values" not in batch:  # evaluation completions
            return {"rewards": batch["rewards"]}
        config = cast(PPOMasterConfig, self.global_args)
        if config["grpo"]["overlong_filtering"]:
            batch["sample_mask"] = batch["sample_mask"] * (~batch["truncated"]).float()
        advantages, returns = compute_advantages(batch, config, reduce=_sum_over_ranks)
        valid = batch["token_mask"] * batch["sample_mask"][:, None]
        self.add_metrics(
            {
                "critic/explained_variance": explained_variance(
                    batch["values"], returns, valid, reduce=_sum_over_ranks
                )
            }
        )
        return {
            "rewards": batch["rewards"],
            "sample_mask": batch["sample_mask"],
            "advantages": advantages,
            "returns": returns,
        }

    def _rewards(self, batch: BatchedDataDict) -> torch.Tensor:
        if self.environment is not None:
            if batch.size == 0:
                return torch.zeros(0)
            return _env_rewards(self, self.environment, batch, self.tokenizer)
        from rl_toolkit.models.reward.reward_model import reward_model_batch

        texts = reward_model_batch(
            self.reward_tokenizer,
            batch["prompts"],
            completion_texts(batch, self.tokenizer),
            max_length=self.global_args["reward_model"]["max_total_sequence_length"],
        )
        rewards = self.scorer.score(texts, self.reward_mbs)["rewards"]  # collective
        if batch.size:
            self.add_metrics({"reward": rewards.mean().item()})
        return rewards

    # A frozen reward model: nothing to checkpoint, sync or move.
    def save_checkpoint(self, path: str) -> None:
        pass

    def load_checkpoint(self, path: str) -> None:
        pass


def _sum_over_ranks(moments: torch.Tensor) -> torch.Tensor:
    """The moments of every rank's shard added up (RewardInference's whitening)."""
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    moments = moments.to(device)
    dist.all_reduce(moments)
    return moments.cpu()


def _train_keys(rollout: BatchedDataDict) -> BatchedDataDict:
    """The rollout's keys a policy-gradient step reads (grpo.py's TRAIN_KEYS)."""
    from rl_toolkit.algorithms.grpo import TRAIN_KEYS

    keys = [key for key in TRAIN_KEYS if key in rollout]
    return BatchedDataDict({k: rollout[k] for k in keys}, group_size=rollout.group_size)


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
