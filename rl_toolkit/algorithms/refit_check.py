"""The check that a separate generation engine samples with the policy's weights.

After a run's first weight refit, the generator's log-probs of its own tokens
(`generation_logprobs`) are compared with the policy's (`Policy.logprobs`) on the same tokens:

    token_mult_prob_error = mean over generated tokens t of exp(|l_gen(t) - l_train(t)|)

NeMo RL's metric: 1.0 when the two agree, about 1 + mean |l_gen - l_train| for small gaps.
Weights the refit missed or mis-mapped give gaps of whole nats; bf16 kernels alone should stay
below 1.02 (the GPU check's bound), and TIS / ICE-POP (`loss_fn.importance_correction`) correct
what remains.
"""

import torch

from rl_toolkit.config_schema import PolicyConfig, micro_batches
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.utils.config import ReportedError


class RefitMismatchError(RuntimeError, ReportedError):
    """The generator's log-probs differ from the policy's beyond the configured threshold."""


def token_mult_prob_error(
    generation_logprobs: torch.Tensor, logprobs: torch.Tensor, token_mask: torch.Tensor
) -> float:
    """``mean_t exp(|l_gen - l_train|)`` over the generated tokens (``token_mask``, ``[N, T]``
    each); 1.0 when there are none."""
    mask = token_mask > 0
    if not mask.any():
        return 1.0
    gap = (generation_logprobs.double() - logprobs.double()).abs()[mask]  # (num_tokens,)
    return gap.exp().mean().item()


def check_refit(policy: Policy, rollout: BatchedDataDict, policy_config: PolicyConfig) -> float:
    """``token_mult_prob_error`` of a rollout sampled right after a refit, scored by the policy.

    Returns:
        The error (a metric to log).

    Raises:
        RefitMismatchError: above ``policy.generation.vllm.refit_check_threshold``; one line
            naming the backend.
    """
    generation = policy_config["generation"]
    threshold = generation["vllm"]["refit_check_threshold"]
    logprob_mbs = micro_batches(policy_config["micro_batch"], "logprob")
    logprobs = policy.logprobs(rollout, logprob_mbs)["logprobs"]  # (N, T)
    error = token_mult_prob_error(rollout["generation_logprobs"], logprobs, rollout["token_mask"])
    if error > threshold:
        raise RefitMismatchError(
            f"policy.generation.backend={generation['backend']}: after the first weight refit "
            f"the generator's log-probs of its own tokens differ from the policy's: "
            f"token_mult_prob_error={error:.4f} > policy.generation.vllm.refit_check_threshold="
            f"{threshold} (weights missed or mis-mapped by the refit, or another dtype; "
            'docs/design.md, "Backend vllm")'
        )
    return error
