"""RewardModel: the driver side of a group of reward-model workers, and an Environment.

``score(prompts, completions, metadata)`` is the environment interface of RL recipes
(rl_toolkit/environments/interfaces.py): the completions are scored by the reward model instead
of a reward function. The reward model reads text: each prompt and completion is tokenised with
the reward model's own tokenizer as a preference pair's response is for reward-model training
(the chat template with the completion as the assistant's turn, EOS at the end;
rl_toolkit/data/tokenization.py), so a policy and its reward model may use different tokenizers.
"""

from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import MicroBatches, RewardModelConfig
from rl_toolkit.data.collate import prompt_collate_fn
from rl_toolkit.data.tokenization import tokenize_prompt, tokenize_response
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.distributed.worker_groups import RayWorkerGroup
from rl_toolkit.environments.interfaces import EnvironmentResult, Prompt
from rl_toolkit.models.reward.worker import RewardModelWorker
from rl_toolkit.utils.hf import get_tokenizer


class RewardModel:
    """A frozen reward model on the workers of ``cluster``; an Environment.

    Args:
        cluster: one worker per bundle (shared with the policy's workers when the cluster was
            built for several worker groups).
        config: the `reward_model` section.
        worker_timeout_s: how long to wait for any call on the workers; None: forever.
        worker_env_vars: driver environment variables the workers get besides the built-in
            allow-list (``cluster.worker_env_vars``).

    Attributes:
        workers: the worker group.
        tokenizer: the reward model's tokenizer.
    """

    def __init__(
        self,
        cluster: RayVirtualCluster,
        config: RewardModelConfig,
        *,
        worker_timeout_s: float | None,
        worker_env_vars: list[str],
    ) -> None:
        self.tokenizer = get_tokenizer(config["tokenizer"], section="reward_model")
        self.max_total_sequence_length = config["max_total_sequence_length"]
        self.micro_batches = reward_micro_batches(config)
        self.workers: RayWorkerGroup[RewardModelWorker] = RayWorkerGroup(
            cluster,
            RewardModelWorker,
            name_prefix="reward_model",
            worker_kwargs={"config": config},
            timeout_s=worker_timeout_s,
            env_vars=worker_env_vars,
        )

    def score_sequences(self, data: BatchedDataDict) -> torch.Tensor:
        """``[N]`` rewards of tokenised sequences (``input_ids``, ``input_lengths``, in the
        reward model's vocabulary), rows in the order of ``data``."""
        shards = self.workers.sharded(RewardModelWorker.score, data, self.micro_batches)
        return BatchedDataDict.from_batches(shards)["rewards"]

    def score(
        self, prompts: list[Prompt], completions: list[str], metadata: list[dict[str, Any]]
    ) -> EnvironmentResult:
        """Rewards of N completions (Environment.score); the metadata is not read."""
        batch = reward_model_batch(
            self.tokenizer, prompts, completions, max_length=self.max_total_sequence_length
        )
        return EnvironmentResult(rewards=self.score_sequences(batch).tolist(), metrics={})

    def shutdown(self) -> None:
        """Leave the process group on every worker, then stop the workers."""
        try:
            if not self.workers.broken:
                self.workers.all(RewardModelWorker.shutdown)
        finally:
            self.workers.shutdown()


def reward_micro_batches(config: RewardModelConfig) -> MicroBatches:
    """How each worker cuts its share of the sequences to score (`reward_model.micro_batch`)."""
    micro_batch = config["micro_batch"]
    return MicroBatches(packed=micro_batch["unit"] == "tokens", size=micro_batch["size"])


def reward_model_input(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    completion: str,
    *,
    max_length: int,
    where: str,
) -> list[int]:
    """A reward model's tokens of a prompt and its completion, as its training pairs were
    tokenised (rl_toolkit/data/tokenization.py): the prompt (chat template with the generation
    prompt, or plain text), the completion, EOS; a sequence longer than `max_length` keeps its
    last tokens (the completion's end, where the score is read).

    Raises:
        PreferenceDataError: chat messages for a tokenizer without a chat template, naming
            `where`.
    """
    where = f"reward model input, {where}"
    prompt_ids = tokenize_prompt(tokenizer, prompt, where)
    response_ids = tokenize_response(tokenizer, prompt, prompt_ids, completion, "completion", where)
    return (prompt_ids + response_ids)[-max_length:]


def reward_model_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    completions: list[str],
    *,
    max_length: int,
) -> BatchedDataDict:
    """The right-padded batch (`input_ids [N, T]`, `input_lengths [N]`) of the reward model's
    tokens of N prompts and completions (`reward_model_input`), rows in order."""
    items: list[dict[str, Any]] = [
        {
            "prompt_id": row,
            "input_ids": torch.tensor(
                reward_model_input(
                    tokenizer, prompt, completion, max_length=max_length, where=f"row {row}"
                )
            ),
            "prompt": prompt,
            "metadata": {},
        }
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True))
    ]
    return prompt_collate_fn(items, pad_token_id=tokenizer.pad_token_id)
