"""Data: preference pairs (DPO), SFT sequences (rl_toolkit.data.sft) and RL prompts
(rl_toolkit.data.prompts): datasets, tokenisation, collate, resumable loaders."""

from rl_toolkit.data.collate import (
    answer_sft_batch,
    pad_batch_to,
    preference_collate_fn,
    prompt_collate_fn,
    repeat_prompts,
    sft_collate_fn,
)
from rl_toolkit.data.dataloader import (
    build_dataloader,
    build_prompt_dataloader,
    build_sft_dataloader,
)
from rl_toolkit.data.datasets import (
    DATASET_BUILDERS,
    PreferencePairDataset,
    load_preference_dataset,
    tokenize_preference_dataset,
)
from rl_toolkit.data.interfaces import PreferenceDataset, TaskDataSpec
from rl_toolkit.data.prompts import PromptDataset, TokenizedPromptDataset, tokenize_prompt_dataset
from rl_toolkit.data.rows import DataError, PreferenceDataError

__all__ = [
    "DATASET_BUILDERS",
    "DataError",
    "PreferenceDataError",
    "PreferenceDataset",
    "PreferencePairDataset",
    "PromptDataset",
    "TaskDataSpec",
    "TokenizedPromptDataset",
    "build_dataloader",
    "build_prompt_dataloader",
    "build_sft_dataloader",
    "load_preference_dataset",
    "pad_batch_to",
    "preference_collate_fn",
    "prompt_collate_fn",
    "answer_sft_batch",
    "repeat_prompts",
    "sft_collate_fn",
    "tokenize_preference_dataset",
    "tokenize_prompt_dataset",
]
