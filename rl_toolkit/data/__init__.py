"""Preference data: config, datasets, tokenisation, pair-aware collate, resumable loader."""

from rl_toolkit.data.collate import pad_batch_to, preference_collate_fn
from rl_toolkit.data.dataloader import build_dataloader
from rl_toolkit.data.datasets import (
    DATASET_BUILDERS,
    PreferencePairDataset,
    load_preference_dataset,
    tokenize_preference_dataset,
)
from rl_toolkit.data.interfaces import PreferenceDataset, TaskDataSpec
from rl_toolkit.data.rows import PreferenceDataError

__all__ = [
    "DATASET_BUILDERS",
    "PreferenceDataError",
    "PreferenceDataset",
    "PreferencePairDataset",
    "TaskDataSpec",
    "build_dataloader",
    "load_preference_dataset",
    "pad_batch_to",
    "preference_collate_fn",
    "tokenize_preference_dataset",
]
