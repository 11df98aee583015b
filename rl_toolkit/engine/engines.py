"""The engines of the usual algorithms: their modules, flow, trainers and parameter syncs.

Module names are the user's (the config's `models.<name>`); the roles are the constructor's
arguments, as ChatLearn has them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.engine.engine import Engine
from rl_toolkit.engine.module import BaseModule


def run(step: Callable[..., Any], *data: Mapping[str, Any]) -> BatchedDataDict:
    """`module.forward_step(*data)` (or eval_step) in a flow: on the driver that call runs on
    the module's workers and returns their rows as one batch (engine/module.py)."""
    result = step(*data)
    assert isinstance(result, BatchedDataDict), "a step called on the driver returns the batch"
    return result


def row_means(output: BatchedDataDict, keys: list[str]) -> dict[str, float]:
    """The mean over the rows of each 1-D numeric value in `keys` (an eval step's outputs)."""
    means = {}
    for key in keys:
        value = output[key]
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel():
            means[key] = value.double().mean().item()
    return means


class DPOEngine(Engine):
    """DPO: the reference scores each batch of preference pairs (`forward_step`), the trainer
    steps on them (`train_step`); the reference builds the dataset.

    Args:
        reference: its forward_step adds `reference_policy_logprobs`.
        policy_trainer: its train_step gets micro-batches with the reference's output; its
            eval_step (optional) returns per-row metrics of the evaluation data.
    """

    def __init__(self, reference: BaseModule, policy_trainer: BaseModule) -> None:
        def flow(batch: BatchedDataDict) -> BatchedDataDict:
            return run(reference.forward_step, batch)

        def eval_flow(batch: BatchedDataDict) -> dict[str, float]:
            scored = run(policy_trainer.eval_step, run(reference.forward_step, batch))
            return row_means(scored, [k for k in scored if k not in batch])

        super().__init__(
            [reference, policy_trainer],
            flow=flow,
            trainers=[policy_trainer],
            dataset_module=reference,
            eval_flow=eval_flow,
            name="DPOEngine",
        )


class GRPOEngine(Engine):
    """GRPO: the policy samples G completions of each prompt, the reference scores them (for a
    KL term), the reward scores them; the trainer steps on them and its weights go back to the
    policy after each episode. The policy builds the dataset.

    Args:
        policy: forward_step: prompts -> completions (G rows a prompt); eval_step: the same for
            evaluation prompts.
        reference: forward_step adds `reference_policy_logprobs` (or nothing without a KL term).
        reward: forward_step adds `rewards`.
        policy_trainer: train_step on the scored completions.
    """

    def __init__(
        self,
        policy: BaseModule,
        reference: BaseModule,
        reward: BaseModule,
        policy_trainer: BaseModule,
    ) -> None:
        def flow(prompts: BatchedDataDict) -> BatchedDataDict:
            completions = run(policy.forward_step, prompts)
            completions = run(reference.forward_step, completions)
            return run(reward.forward_step, completions)

        def eval_flow(prompts: BatchedDataDict) -> dict[str, float]:
            return reward_metrics(run(reward.forward_step, run(policy.eval_step, prompts)))

        super().__init__(
            [policy, reference, reward, policy_trainer],
            flow=flow,
            trainers=[policy_trainer],
            dataset_module=policy,
            eval_flow=eval_flow,
            name="GRPOEngine",
        )
        self.set_parameter_sync(policy_trainer, policy)


class RLHFEngine(Engine):
    """PPO-style RLHF with six modules: the policy samples, the reference, the value model and
    the reward model score; the reward module gets all three outputs (to compute advantages and
    returns, as in ChatLearn); the two trainers step; both inference models get their
    trainer's weights after each episode. The policy builds the dataset.
    """

    def __init__(
        self,
        policy: BaseModule,
        reference: BaseModule,
        reward: BaseModule,
        value: BaseModule,
        policy_trainer: BaseModule,
        value_trainer: BaseModule,
    ) -> None:
        def flow(prompts: BatchedDataDict) -> BatchedDataDict:
            completions = run(policy.forward_step, prompts)
            reference_out = run(reference.forward_step, completions)
            value_out = run(value.forward_step, completions)
            return run(reward.forward_step, completions, reference_out, value_out)

        def eval_flow(prompts: BatchedDataDict) -> dict[str, float]:
            return reward_metrics(run(reward.forward_step, run(policy.eval_step, prompts)))

        super().__init__(
            [policy, reference, reward, value, policy_trainer, value_trainer],
            flow=flow,
            trainers=[policy_trainer, value_trainer],
            dataset_module=policy,
            eval_flow=eval_flow,
            name="RLHFEngine",
        )
        self.set_parameter_sync(policy_trainer, policy)
        self.set_parameter_sync(value_trainer, value)


def reward_metrics(scored: BatchedDataDict) -> dict[str, Any]:
    """`reward`: the mean reward of the completions; with G > 1 completions a prompt also
    `pass@G`: the mean over prompts of their best completion's reward."""
    rewards = scored["rewards"].double()
    metrics = {"reward": rewards.mean().item()}
    group_size = scored.group_size
    if group_size > 1:
        metrics[f"pass@{group_size}"] = rewards.view(-1, group_size).max(dim=1).values.mean().item()
    return metrics
