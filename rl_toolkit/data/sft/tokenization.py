"""Tokenising an SFT row into its token ids and the mask of the tokens the loss learns.

    chat               the conversation through the chat template; the loss mask covers each
                       assistant turn: its content and the end-of-turn tokens the template
                       writes after it (e.g. `<|eot_id|>`, `<|im_end|>\\n`), not the assistant
                       header, nor any system, user or tool turn. Nothing is appended: the
                       template ends the turns.
    prompt_completion  the prompt, then the completion ending with EOS (as a DPO response:
                       rl_toolkit/data/tokenization.py); the loss mask covers the completion.
    text               the text with the tokenizer's special tokens (e.g. BOS), ending with
                       EOS; the loss mask covers every token.

Assistant turns are found by rendering prefixes of the conversation (NeMo RL's and TRL's way
without `{% generation %}` markers in the template): assistant message i spans the tokens
between the rendering of messages[:i] with the generation prompt and the rendering of
messages[:i + 1] without it. Both renderings must be token prefixes of the whole conversation's;
a template for which they are not (e.g. one that rewrites earlier turns, as Qwen3's drops their
reasoning) is a DataError naming the row.
"""

from collections.abc import Callable
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from rl_toolkit.data.interfaces import Text
from rl_toolkit.data.rows import DataError
from rl_toolkit.data.sft.rows import FORMAT_COLUMNS
from rl_toolkit.data.tokenization import (
    collapse_leading_bos,
    render_messages,
    tokenize_prompt,
    tokenize_response,
)

# (input_ids, loss_mask): the sequence's token ids and, per token, whether the loss learns it
Tokenized = tuple[list[int], list[bool]]


def _rendered_prefix(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    generation_prompt: bool,
    full: list[int],
    where: str,
) -> int:
    """The number of tokens of `messages` rendered alone, which must be a prefix of `full`."""
    ids = render_messages(tokenizer, messages, generation_prompt)
    if full[: len(ids)] != ids:
        raise DataError(
            f"{where}: the chat template renders the first {len(messages)} messages "
            f"({'with' if generation_prompt else 'without'} the generation prompt) to tokens "
            "that are not a prefix of the whole conversation's, so the assistant tokens cannot "
            "be told apart; fix the template or the data"
        )
    return len(ids)


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], where: str
) -> Tokenized:
    """Token ids of a conversation and the mask of its assistant turns (module docstring).

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: the conversation; it opens with a non-assistant message.
        where: "source, row N" for error messages.

    Raises:
        DataError: no chat template, or a template whose prefixes are not token prefixes.
    """
    if tokenizer.chat_template is None:
        raise DataError(
            f"{where}: chat rows need a chat template, but the tokenizer has none; set "
            "policy.tokenizer.chat_template, or use data.format=prompt_completion or text"
        )
    full = render_messages(tokenizer, messages, generation_prompt=False)
    mask = [False] * len(full)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _rendered_prefix(tokenizer, messages[:index], True, full, where)
        end = _rendered_prefix(tokenizer, messages[: index + 1], False, full, where)
        mask[start:end] = [True] * (end - start)
    return full, mask


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Text, completion: Text, where: str
) -> Tokenized:
    """Token ids of prompt + completion + EOS and the mask of the completion (EOS included).

    With a chat template the prompt is the user's turn (or messages) with the generation
    prompt and the completion the assistant's answer; without one both are plain text.

    Raises:
        DataError: see rl_toolkit.data.tokenization.tokenize_prompt / tokenize_response.
    """
    prompt_ids = tokenize_prompt(tokenizer, prompt, where)
    completion_ids = tokenize_response(
        tokenizer, prompt, prompt_ids, completion, "completion", where
    )
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, where: str) -> Tokenized:
    """Token ids of a text (with the tokenizer's special tokens, one BOS) + EOS; all learned.

    Raises:
        DataError: the tokenizer has no EOS token.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(
            f"{where}: the tokenizer has no EOS token, which ends every text; set "
            "policy.tokenizer.name to a tokenizer with one"
        )
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = collapse_leading_bos(ids, tokenizer.bos_token_id)
    if not ids or ids[-1] != eos_id:  # some tokenizers append EOS themselves
        ids = ids + [eos_id]
    return ids, [True] * len(ids)


_FORMAT_TOKENIZERS: dict[str, Callable[..., Tokenized]] = {
    "chat": tokenize_chat,
    "prompt_completion": tokenize_prompt_completion,
    "text": tokenize_text,
}


def tokenize_sft_row(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], data_format: str, where: str
) -> Tokenized:
    """Token ids and loss mask of a formatted row of `data_format` (data.format).

    The first token is never learned: no token comes before it to predict it.
    """
    columns = FORMAT_COLUMNS[data_format]
    ids, mask = _FORMAT_TOKENIZERS[data_format](tokenizer, *(row[c] for c in columns), where)
    return ids, [False, *mask[1:]]


def fit_sequence(
    ids: list[int],
    mask: list[bool],
    *,
    max_total_sequence_length: int,
    overlong_policy: Literal["drop", "truncate"],
) -> Tokenized | None:
    """The sequence cut to the length policy, or None to drop it.

    "drop" drops a sequence longer than max_total_sequence_length; "truncate" keeps its first
    max_total_sequence_length tokens (the end of the sequence is lost, the prompt is kept) and
    drops it only if no learned token is left.

    Returns:
        (ids, mask), unchanged when the sequence fits; or None (drop).
    """
    if len(ids) <= max_total_sequence_length:
        return ids, mask
    if overlong_policy == "drop":
        return None
    ids, mask = ids[:max_total_sequence_length], mask[:max_total_sequence_length]
    return (ids, mask) if any(mask) else None
