"""What a generation backend offers the RL algorithms, whichever engine samples.

Backend ``hf`` is ``rl_toolkit.models.policy.lm_policy.Policy`` itself (the policy workers
sample); backend ``vllm`` is ``vllm_generation.VllmGeneration``, with workers of its own and a
weight refit. The batches, prompts in and the rollout out, are described in docs/design.md
("Generation").
"""

from typing import TYPE_CHECKING, Protocol

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict

if TYPE_CHECKING:
    from rl_toolkit.models.policy.lm_policy import Policy


class GenerationInterface(Protocol):
    """Sample responses to prompts with the policy's current weights."""

    def generate(
        self, data: BatchedDataDict, *, step: int, greedy: bool = False
    ) -> BatchedDataDict:
        """One response per row of a prompt batch, seeded per ``(seed, step, prompt, sample)``.

        Args:
            data: the prompt batch: ``input_ids [N, P]`` right-padded, ``input_lengths [N]``,
                ``prompt_ids [N]``, ``sample_idx [N]``, ``group_size`` samples of a prompt
                together; other keys are carried over.
            step: the training step (part of each row's sampling seed).
            greedy: the most likely token at every position (validation) instead of sampling.

        Returns:
            The rollout batch, rows in the order of ``data``.
        """
        ...

    def prepare_for_generation(self, tags: list[str] | None = None) -> None:
        """Make the engine ready to generate (e.g. wake vLLM up: ``tags`` "weights",
        "kv_cache"); a no-op where the engine is always ready."""
        ...

    def finish_generation(self) -> None:
        """Free what generating holds between rollouts (e.g. put vLLM to sleep)."""
        ...

    def update_weights(self, source: "Policy") -> dict[str, float]:
        """Load the policy's current weights into the engine; returns timing metrics."""
        ...

    def shutdown(self) -> None:
        """Stop the engine's workers."""
        ...
