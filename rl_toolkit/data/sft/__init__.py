"""SFT data: chat, prompt-completion and plain-text rows; tokenisation with the loss mask."""

from rl_toolkit.data.sft.dataset import SFTSequenceDataset, tokenize_sft_dataset
from rl_toolkit.data.sft.rows import FORMAT_COLUMNS, SFTDataset, load_sft_rows
from rl_toolkit.data.sft.tokenization import (
    fit_sequence,
    tokenize_chat,
    tokenize_prompt_completion,
    tokenize_sft_row,
    tokenize_text,
)

__all__ = [
    "FORMAT_COLUMNS",
    "SFTDataset",
    "SFTSequenceDataset",
    "fit_sequence",
    "load_sft_rows",
    "tokenize_chat",
    "tokenize_prompt_completion",
    "tokenize_sft_row",
    "tokenize_sft_dataset",
    "tokenize_text",
]
