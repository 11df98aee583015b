"""Next-token log-probs (and entropies) computed chunk by chunk, so full-vocabulary logits
never exist at once.

A micro-batch of ``b`` rows and ``T`` positions would need a ``[b, T, V]`` float32 tensor for a
plain ``log_softmax(lm_head(hidden)).gather(...)``, and autograd would keep it (and the softmax)
alive until the backward pass. Here the tokens are processed ``chunk_size`` at a time: the
forward keeps only the log-sum-exp (and, when asked for, the entropy) of each token (``[N]``),
and the backward recomputes one chunk's logits at a time. Peak extra memory is a few
``chunk_size * V * 4`` bytes, whatever ``b`` and ``T`` are.
"""

from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from rl_toolkit.models.attention import packed_row_kwargs


class TokenOutputs(NamedTuple):
    """What the chunked kernel computes for each scored token, float32, same shape each.

    logprobs: ``log p(token | tokens before it)``.
    entropy: ``H = -sum_v p_v log p_v`` of the distribution that token was drawn from; None
        unless asked for (``with_entropy``).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def _float_dtype(tensor: torch.Tensor) -> torch.dtype:
    # Logits and their softmax in float32 at least (bf16 matmul, float32 log-softmax).
    return torch.promote_types(tensor.dtype, torch.float32)


class _ChunkedTokenOutputs(torch.autograd.Function):
    """``log softmax(hidden @ weight.T)[target]`` per token, and optionally the entropy of
    ``softmax(hidden @ weight.T)``, chunked over tokens."""

    @staticmethod
    def forward(
        ctx: Any,  # FunctionCtx, which also carries chunk_size to backward
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # hidden: (N, H), weight: (V, H), targets: (N,) -> logprobs (N,), entropy (N,) | None
        num_tokens = hidden.shape[0]
        logprobs = torch.empty(num_tokens, dtype=_float_dtype(hidden), device=hidden.device)
        logsumexp = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits = (hidden[start:end] @ weight.T).to(logprobs.dtype)  # (n, V)
            logsumexp[start:end] = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, targets[start:end, None]).squeeze(1)
            logprobs[start:end] = target_logits - logsumexp[start:end]
            if entropy is not None:
                all_logprobs = logits.sub_(logsumexp[start:end, None])  # (n, V), in place
                entropy[start:end] = -(all_logprobs.exp() * all_logprobs).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, targets, logsumexp, entropy)
        ctx.chunk_size = chunk_size
        # An output that the loss does not use gets a None gradient, not zeros to multiply.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        hidden, weight, targets, logsumexp, entropy = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(logsumexp)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Accumulate in float32 even for bf16 weights: many chunks add into one tensor.
        grad_weight = (
            torch.zeros(weight.shape, dtype=logsumexp.dtype, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            logits = (hidden[start:end] @ weight.T).to(logsumexp.dtype)  # (n, V)
            all_logprobs = logits.sub_(logsumexp[start:end, None])  # (n, V), in place
            # d logprob / d logits = onehot(target) - p;  d H / d logits = -p (log p + H)
            grad_out = grad_logprobs[start:end, None]  # (n, 1)
            if grad_entropy is not None:
                probs = all_logprobs.exp()
                log_p_plus_h = all_logprobs.add_(entropy[start:end, None])  # (n, V), in place
                grad_out = grad_out + grad_entropy[start:end, None] * log_p_plus_h  # (n, V)
            else:
                probs = all_logprobs.exp_()  # (n, V), in place: the log-probs are not needed
            grad_logits = probs.mul_(grad_out).neg_()  # -p * grad_out, in place
            grad_logits.scatter_add_(1, targets[start:end, None], grad_logprobs[start:end, None])
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.T @ hidden[start:end]
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def selected_token_outputs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    target_index: torch.Tensor,
    chunk_size: int,
    *,
    with_entropy: bool = False,
) -> TokenOutputs:
    """Log-probs (and entropies) of the tokens at ``target_index`` only, each given the tokens
    before it.

    The token at flat position ``k`` of ``input_ids.view(-1)`` is predicted from the hidden state
    at ``k - 1``; only the listed tokens go through ``lm_head`` (e.g. the response tokens), chunk
    by chunk, so prompt and padding positions cost no vocabulary projection at all.

    Args:
        hidden: final hidden states (after the last norm), ``[b, T, H]``.
        lm_head_weight: output projection, ``[V, H]`` (no bias).
        input_ids: ``[b, T]`` int64 tokens (a packed row is ``b = 1``).
        target_index: ``[n]`` int64 flat positions in ``input_ids.view(-1)``, none of them the
            first token of a sequence.
        chunk_size: number of tokens whose ``[chunk_size, V]`` logits exist at once.
        with_entropy: also compute each token's entropy (one more pass over each chunk's
            probabilities, forward and backward).

    Returns:
        ``TokenOutputs`` of ``[n]`` float32 tensors, differentiable w.r.t. ``hidden`` and
        ``lm_head_weight``; ``entropy`` is None without ``with_entropy``.
    """
    assert chunk_size > 0, "chunk_size must be positive"
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])[target_index - 1]  # (n, H)
    targets = input_ids.reshape(-1)[target_index]  # (n,)
    logprobs, entropy = _ChunkedTokenOutputs.apply(
        flat_hidden, lm_head_weight, targets, chunk_size, with_entropy
    )
    return TokenOutputs(logprobs, entropy)


class LogprobModel(nn.Module):
    """A causal LM whose forward returns next-token log-probs (``TokenOutputs``) instead of logits.

    The log-probs are computed inside this module's forward so that the FSDP2 root (this module)
    has its parameters, ``lm_head`` included, gathered while the chunked projection runs.

    Args:
        causal_lm: a Hugging Face ``*ForCausalLM`` model.
        chunk_size: tokens whose full-vocabulary logits exist at once.
    """

    def __init__(self, causal_lm: PreTrainedModel, chunk_size: int) -> None:
        super().__init__()
        if causal_lm.get_output_embeddings().bias is not None:
            raise ValueError(
                f"{type(causal_lm).__name__}: an lm_head with a bias is not supported by the "
                "chunked log-prob computation"
            )
        self.causal_lm = causal_lm
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        target_index: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        with_entropy: bool = False,
    ) -> TokenOutputs:
        """Log-probs (and entropies) of the tokens at ``target_index``, each given the tokens
        before it.

        Args:
            input_ids: ``[b, T]`` padded rows, or one packed row ``[1, L]``.
            target_index: ``[n]`` flat positions in ``input_ids.view(-1)`` to score.
            attention_mask: ``[b, T]`` 1 on real tokens (padded rows); None for a packed row.
            position_ids: ``[1, L]`` restarting at 0 for every sequence (packed row); None for
                padded rows.
            cu_seq_lens: ``[k + 1]`` cumulative sequence lengths of a packed row, for
                variable-length attention (``pack_rows``); None for padded rows.
            with_entropy: also compute each token's entropy (for a loss that reads it).

        Returns:
            ``TokenOutputs`` of ``[n]`` float32 tensors (``entropy`` None without
            ``with_entropy``).
        """
        hidden = self.causal_lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **packed_row_kwargs(cu_seq_lens),
        ).last_hidden_state  # (b, T, H)
        weight = self.causal_lm.get_output_embeddings().weight  # (V, H)
        return selected_token_outputs(
            hidden, weight, input_ids, target_index, self.chunk_size, with_entropy=with_entropy
        )
