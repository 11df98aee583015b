"""Tokenising a prompt and its responses (a preference pair, an SFT prompt-completion row), and
the length policy for overlong pairs.

With a chat template, the prompt is rendered with `add_generation_prompt=True` and the full
conversation (prompt + assistant response) without it; the prompt's tokens must be a prefix
of the full conversation's tokens, and the response tokens are the rest. Without a template,
the prompt is tokenised as plain text (with the tokenizer's own special tokens, e.g. BOS) and
the response as plain text without special tokens. The response ends with EOS: appended,
unless the template's assistant turn already contains the EOS token (e.g. ChatML's
`<|im_end|>` when it is the tokenizer's EOS).
"""

from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from rl_toolkit.data.interfaces import Text
from rl_toolkit.data.rows import PreferenceDataError

OVERLONG_POLICIES = ("drop", "truncate_prompt")


def _as_messages(text: Text, role: str) -> list[dict[str, Any]]:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def collapse_leading_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """Keep one BOS where a template writes one and the tokenizer adds another."""
    if bos_id is None:
        return ids
    start = 0
    while start + 1 < len(ids) and ids[start] == bos_id and ids[start + 1] == bos_id:
        start += 1
    return ids[start:]


def render_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], generation_prompt: bool
) -> list[int]:
    """Token ids of `messages` through the chat template (the template places BOS, if any)."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return collapse_leading_bos(ids, tokenizer.bos_token_id)


def _check_plain_text(value: Text, key: str, where: str) -> str:
    if isinstance(value, list):
        raise PreferenceDataError(
            f"{where}: {key!r} is a list of chat messages but the tokenizer has no chat "
            "template; use a tokenizer with one, or plain-text data"
        )
    return value


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Text, where: str) -> list[int]:
    """Token ids of a prompt: through the chat template with the generation prompt, or as
    plain text with the tokenizer's special tokens (BOS appears only at its head).

    Raises:
        PreferenceDataError: messages without a chat template, or a prompt with no tokens.
    """
    if tokenizer.chat_template is None:
        prompt_text = _check_plain_text(prompt, "prompt", where)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        prompt_ids = collapse_leading_bos(prompt_ids, tokenizer.bos_token_id)
    else:
        prompt_ids = render_messages(
            tokenizer, _as_messages(prompt, "user"), generation_prompt=True
        )
    if not prompt_ids:
        raise PreferenceDataError(f"{where}: the prompt has no tokens")
    return prompt_ids


def tokenize_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Text,
    prompt_ids: list[int],
    response: Text,
    key: str,
    where: str,
) -> list[int]:
    """Token ids of a response to `prompt` (whose ids are `prompt_ids`), ending with EOS.

    Args:
        tokenizer: a HF tokenizer with an EOS token.
        prompt: the prompt, as given to tokenize_prompt.
        prompt_ids: tokenize_prompt's result.
        response: a string or chat messages (the assistant's turn when a string).
        key: the response's column, for error messages.
        where: "source, row N" for error messages.

    Returns:
        The response's ids; the sequence is prompt_ids + response ids.

    Raises:
        PreferenceDataError: no EOS token, messages without a chat template, or a template
            whose prompt rendering is not a token prefix of the full conversation.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise PreferenceDataError(
            "the tokenizer has no EOS token; responses must end with one (set "
            "policy.tokenizer.name to a tokenizer with one)"
        )
    if tokenizer.chat_template is None:
        text = _check_plain_text(response, key, where)
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
    messages = _as_messages(prompt, "user") + _as_messages(response, "assistant")
    full = render_messages(tokenizer, messages, generation_prompt=False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise PreferenceDataError(
            f"{where}: the chat template renders the prompt (with the generation prompt) "
            f"to tokens that are not a prefix of the prompt + {key} conversation, so the "
            "response tokens cannot be told apart; fix the template or the data"
        )
    response_ids = full[len(prompt_ids) :]
    return response_ids if eos_id in response_ids else response_ids + [eos_id]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Text,
    chosen: Text,
    rejected: Text,
    where: str,
) -> tuple[list[int], list[int], list[int]]:
    """Token ids of a pair: (prompt, chosen response + EOS, rejected response + EOS).

    Args:
        tokenizer: a HF tokenizer with an EOS token.
        prompt, chosen, rejected: strings or chat message lists.
        where: "source, row N" for error messages.

    Returns:
        (prompt_ids, chosen_ids, rejected_ids); the sequence of a response is
        prompt_ids + response_ids, and BOS (if the tokenizer has one) appears only at its head.

    Raises:
        PreferenceDataError: see tokenize_prompt and tokenize_response.
    """
    prompt_ids = tokenize_prompt(tokenizer, prompt, where)
    chosen_ids, rejected_ids = (
        tokenize_response(tokenizer, prompt, prompt_ids, response, key, where)
        for key, response in (("chosen_response", chosen), ("rejected_response", rejected))
    )
    return prompt_ids, chosen_ids, rejected_ids


def fit_prompt(
    prompt_ids: list[int],
    max_response_length: int,
    *,
    max_total_sequence_length: int,
    overlong_policy: Literal["drop", "truncate_prompt"],
    bos_id: int | None,
) -> list[int] | None:
    """The prompt ids to use so that prompt + longest response fits, or None to drop the pair.

    "drop" drops any pair that does not fit. "truncate_prompt" removes prompt tokens from the
    left, keeping a leading BOS, so the end of the prompt (the latest turn and the template's
    generation prompt) stays next to the response; if not even one prompt token besides BOS
    fits next to the longest response, the pair is dropped.

    Args:
        prompt_ids: the prompt's token ids.
        max_response_length: the longer of the two responses (with EOS), in tokens.
        max_total_sequence_length: the longest sequence (prompt + response) allowed.
        overlong_policy: "drop" or "truncate_prompt".
        bos_id: the tokenizer's BOS id, or None.

    Returns:
        prompt_ids unchanged if the pair fits, truncated prompt ids, or None (drop).
    """
    if len(prompt_ids) + max_response_length <= max_total_sequence_length:
        return prompt_ids
    if overlong_policy == "drop":
        return None
    head = prompt_ids[:1] if bos_id is not None and prompt_ids[0] == bos_id else []
    budget = max_total_sequence_length - max_response_length - len(head)
    if budget < 1:
        return None
    return head + prompt_ids[-budget:]
