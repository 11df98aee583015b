"""Seeded token choice: pure functions from logits to tokens, with no model and no process group.

A response's tokens depend only on its own logits and on uniforms drawn from a generator seeded
by ``(seed, step, prompt_id, sample_idx)``: not on the number of workers, on the other rows of
the batch or on their padding. Each position of a row consumes one uniform, and the token is
the inverse CDF of the sampling distribution at that uniform (in vocabulary order), so a row
draws the same uniform at position ``t`` whatever happened to the others.
"""

import hashlib

import torch

from rl_toolkit.config_schema import SamplingConfig


def row_seed(seed: int, step: int, prompt_id: int, sample_idx: int) -> int:
    """The seed of one response's generator: a hash of its four keys, in ``[0, 2**63)``.

    Args:
        seed: the run's seed (``policy.seed``).
        step: the training step the rollout belongs to.
        prompt_id: the prompt's index in its dataset (``prompt_ids``).
        sample_idx: which of the prompt's samples this is (``sample_idx``).
    """
    key = repr((seed, step, prompt_id, sample_idx)).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sampling_uniforms(seeds: list[int], num_positions: int) -> torch.Tensor:
    """``[N, num_positions]`` float64 uniforms in ``[0, 1)``, row ``i`` from its own seed.

    A row's first ``k`` values do not depend on ``num_positions`` (a generator draws them in
    order), nor on the other rows.
    """
    uniforms = torch.empty(len(seeds), num_positions, dtype=torch.float64)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        uniforms[row] = torch.rand(num_positions, generator=generator, dtype=torch.float64)
    return uniforms


def sampling_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Log-probs ``[b, V]`` of the distribution tokens are drawn from; ``-inf`` outside it.

    Temperature first, then top-k (ties with the k-th logit are kept), then top-p on what is
    left: the most likely tokens are kept until their probability reaches ``top_p``, the token
    that crosses it included, so at least one token always remains.

    Args:
        logits: ``[b, V]`` float32 next-token logits.
        sampling: ``temperature``, ``top_k`` (0: off) and ``top_p`` (1.0: off) are read.
    """
    logits = logits / sampling["temperature"]
    if 0 < sampling["top_k"] < logits.shape[-1]:
        kth_largest = logits.topk(sampling["top_k"], dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1)
    if sampling["top_p"] < 1.0:
        sorted_logprobs, order = logprobs.sort(dim=-1, descending=True)
        sorted_probs = sorted_logprobs.exp()
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # of the likelier tokens
        drop = torch.empty_like(mass_before, dtype=torch.bool)
        drop.scatter_(-1, order, mass_before >= sampling["top_p"])  # back to vocabulary order
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    return logprobs


def inverse_cdf_sample(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens ``[b]``: the first token whose cumulative probability exceeds ``u * total``.

    Args:
        logprobs: ``[b, V]`` (possibly unnormalised) log-probs; ``-inf`` tokens are never drawn.
        uniforms: ``[b]`` values in ``[0, 1)``.
    """
    cdf = (
        logprobs.double().exp().cumsum(dim=-1)
    )  # (b, V), float64 so that V terms add exactly enough
    # u < 1, so the target lies below the total and some token with probability > 0 exceeds it.
    target = uniforms.to(cdf) * cdf[:, -1]
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)


def choose_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    sampling: SamplingConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-prob under the model's own distribution.

    Args:
        logits: ``[b, V]`` float32 next-token logits.
        uniforms: ``[b]`` one uniform per row, or None for greedy decoding (the argmax of the
            logits; ``sampling`` is then ignored).
        sampling: temperature, top-k and top-p of the sampling distribution.

    Returns:
        ``tokens [b]`` int64 and ``logprobs [b]`` float32: ``log softmax(logits)[token]`` at
        temperature 1 without top-k/top-p, the log-prob ``PolicyWorker.logprobs`` gives the
        same token (what the losses compare with).
    """
    if uniforms is None:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = inverse_cdf_sample(sampling_logprobs(logits, sampling), uniforms)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs
