"""Data: preference pairs (DPO) and SFT sequences (rl_toolkit.data.sft): datasets,
tokenisation, collate, resumable loaders."""

from rl_toolkit.data.collate import pad_batch_to, preference_collate_fn, sft_collate_fn
from rl_toolkit.data.dataloader import build_dataloader, build_sft_dataloader
from rl_toolkit.data.datasets import (
    DATASET_BUILDERS,
    PreferencePairDataset,
    load_preference_dataset,
    tokenize_preference_dataset,
)
from rl_toolkit.data.interfaces import PreferenceDataset, TaskDataSpec
from rl_toolkit.data.rows import DataError, PreferenceDataError

__all__ = [
    "DATASET_BUILDERS",
    "DataError",
    "PreferenceDataError",
    "PreferenceDataset",
    "PreferencePairDataset",
    "TaskDataSpec",
    "build_dataloader",
    "build_sft_dataloader",
    "load_preference_dataset",
    "pad_batch_to",
    "preference_collate_fn",
    "sft_collate_fn",
    "tokenize_preference_dataset",
]
