"""Chunked next-token log-probs and entropies: values and gradients equal the naive full-logits
computation."""

import pytest
import torch

from rl_toolkit.models.policy.logprobs import selected_token_outputs


def chunked_next_token_outputs(hidden, weight, input_ids, input_lengths, chunk_size):
    """``[b, T]`` log-probs and entropies of every scored position (``1 <= t < length``) through
    the chunked kernel, 0.0 elsewhere: the layout the worker builds from
    ``selected_token_outputs``."""
    positions = torch.arange(input_ids.shape[1])[None, :]
    scored = (positions >= 1) & (positions < input_lengths[:, None])  # (b, T)
    rows, cols = scored.nonzero(as_tuple=True)
    flat = selected_token_outputs(
        hidden, weight, input_ids, rows * input_ids.shape[1] + cols, chunk_size, with_entropy=True
    )
    return tuple(
        torch.zeros(scored.shape, dtype=values.dtype).index_put((rows, cols), values)
        for values in flat
    )


def chunked_next_token_logprobs(hidden, weight, input_ids, input_lengths, chunk_size):
    """Log-probs only, as the kernel computes them without ``with_entropy``."""
    positions = torch.arange(input_ids.shape[1])[None, :]
    scored = (positions >= 1) & (positions < input_lengths[:, None])  # (b, T)
    rows, cols = scored.nonzero(as_tuple=True)
    flat = selected_token_outputs(
        hidden, weight, input_ids, rows * input_ids.shape[1] + cols, chunk_size
    )
    assert flat.entropy is None
    return torch.zeros(scored.shape, dtype=flat.logprobs.dtype).index_put((rows, cols), flat[0])


def _at_least_float32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _naive(hidden, weight, input_ids, input_lengths):
    logits = hidden @ weight.T  # (b, T, V)
    logprobs = torch.log_softmax(_at_least_float32(logits), dim=-1)[:, :-1]
    logprobs = logprobs.gather(2, input_ids[:, 1:, None]).squeeze(2)
    logprobs = torch.nn.functional.pad(logprobs, (1, 0))
    positions = torch.arange(input_ids.shape[1])[None, :]
    return logprobs * ((positions >= 1) & (positions < input_lengths[:, None]))


def _naive_entropy(hidden, weight, input_lengths):
    """``[b, T]``: at position t the entropy of the distribution over token t (from t - 1)."""
    logits = _at_least_float32(hidden @ weight.T)  # (b, T, V)
    logprobs = torch.log_softmax(logits, dim=-1)[:, :-1]  # (b, T - 1, V)
    entropy = torch.nn.functional.pad(-(logprobs.exp() * logprobs).sum(-1), (1, 0))
    positions = torch.arange(hidden.shape[1])[None, :]
    return entropy * ((positions >= 1) & (positions < input_lengths[:, None]))


def _inputs(batch=3, seq_len=9, hidden_size=8, vocab=50):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    input_lengths = torch.tensor([seq_len, 5, 2])[:batch]
    return hidden, weight, input_ids, input_lengths


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_equals_naive_values_and_grads(chunk_size):
    hidden, weight, input_ids, input_lengths = _inputs()
    upstream = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(1))

    expected = _naive(hidden, weight, input_ids, input_lengths)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [hidden, weight])
    got = chunked_next_token_logprobs(hidden, weight, input_ids, input_lengths, chunk_size)
    got_grads = torch.autograd.grad((got * upstream).sum(), [hidden, weight])

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.all(got[:, 0] == 0) and torch.all(got[1, 5:] == 0) and torch.all(got[2, 2:] == 0)
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_entropy_equals_naive_values_and_grads(chunk_size):
    hidden, weight, input_ids, input_lengths = _inputs()
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    generator = torch.Generator().manual_seed(2)
    upstream_logprobs = torch.randn(input_ids.shape, generator=generator, dtype=torch.float64)
    upstream_entropy = torch.randn(input_ids.shape, generator=generator, dtype=torch.float64)

    expected_logprobs = _naive(hidden, weight, input_ids, input_lengths)
    expected = _naive_entropy(hidden, weight, input_lengths)
    logprobs, entropy = chunked_next_token_outputs(
        hidden, weight, input_ids, input_lengths, chunk_size
    )
    torch.testing.assert_close(entropy, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-9, rtol=0)
    assert torch.all(entropy[:, 0] == 0) and torch.all(entropy[2, 2:] == 0)
    assert torch.all(entropy[0, 1:] > 0)
    # The entropy alone (log-probs unused: no gradient reaches them), then both together.
    for objective in (
        lambda lp, h: (h * upstream_entropy).sum(),
        lambda lp, h: (lp * upstream_logprobs + h * upstream_entropy).sum(),
    ):
        expected_grads = torch.autograd.grad(
            objective(expected_logprobs, expected), [hidden, weight], retain_graph=True
        )
        got_grads = torch.autograd.grad(
            objective(logprobs, entropy), [hidden, weight], retain_graph=True
        )
        for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(got_grad, expected_grad, atol=1e-9, rtol=1e-9)


def test_chunked_passes_gradcheck_in_float64():
    hidden, weight, input_ids, input_lengths = _inputs(batch=2, seq_len=5, hidden_size=3, vocab=6)
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()

    def fn(h, w):
        return chunked_next_token_outputs(h, w, input_ids, input_lengths, 3)

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


@pytest.mark.parametrize("chunked", [chunked_next_token_logprobs, chunked_next_token_outputs])
def test_chunked_keeps_no_full_vocabulary_tensor_for_backward(chunked):
    # 2 rows x 256 tokens, vocabulary 4096: full float32 log-probs would be 8 MiB.
    hidden, weight, input_ids, input_lengths = _inputs(
        batch=2, seq_len=256, hidden_size=16, vocab=4096
    )
    input_lengths = torch.tensor([256, 200])
    full_logits_bytes = 2 * 256 * 4096 * 4

    naive = _saved_bytes(lambda: _naive(hidden, weight, input_ids, input_lengths))
    saved = _saved_bytes(lambda: chunked(hidden, weight, input_ids, input_lengths, 64))

    assert naive >= full_logits_bytes
    # hidden [N, H] + weight [V, H] + log-sum-exp [N] + targets [N] (+ entropy [N]): far below
    # [N, V].
    assert saved < full_logits_bytes / 10
