"""The resumable dataloaders (preference pairs, SFT sequences, RL prompts) and their seeded,
stateful shuffle."""

from collections.abc import Callable, Iterator, Sized
from functools import partial
from typing import Any, cast

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from rl_toolkit.config_schema import DataConfig, PromptDataConfig, SFTDataConfig
from rl_toolkit.data.collate import preference_collate_fn, prompt_collate_fn, sft_collate_fn
from rl_toolkit.data.datasets import PreferencePairDataset
from rl_toolkit.data.prompts import TokenizedPromptDataset
from rl_toolkit.data.sft.dataset import SFTSequenceDataset


class SeededShuffleSampler(torch.utils.data.Sampler[int]):
    """Indices in a fresh random order each epoch; epoch e uses torch.randperm seeded by seed + e.

    The permutation is drawn lazily, when an epoch's first index is taken, so it does not
    matter how many iterators the loader creates (with worker processes StatefulDataLoader
    creates two per epoch, which shifts the order of torchdata's own RandomSampler). The
    sampler and its iterator are Stateful: the state is (next epoch) and (epoch, indices
    taken), so a restored loader continues with exactly the next index.

    Args:
        num_items: dataset length.
        seed: base seed (dpo.seed, sft.seed).
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0  # the next epoch to start

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> "_ShuffleIterator":
        return _ShuffleIterator(self)

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = state_dict["epoch"]


class _ShuffleIterator(Iterator[int]):
    """One epoch of SeededShuffleSampler; claims its epoch number on the first next()."""

    def __init__(self, sampler: SeededShuffleSampler) -> None:
        self.sampler = sampler
        self.epoch: int | None = None
        self.order: list[int] = []
        self.num_taken = 0

    def _start(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = self.sampler.permutation(epoch)
        self.sampler.epoch = epoch + 1

    def __next__(self) -> int:
        if self.epoch is None:
            self._start(self.sampler.epoch)
        if self.num_taken == len(self.order):
            raise StopIteration
        self.num_taken += 1
        return self.order[self.num_taken - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "num_taken": self.num_taken}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["epoch"] is not None:
            self._start(state_dict["epoch"])
            self.num_taken = state_dict["num_taken"]


def build_dataloader(
    dataset: PreferencePairDataset,
    tokenizer: PreTrainedTokenizerBase,
    data_config: DataConfig,
    *,
    num_pairs: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
) -> StatefulDataLoader:
    """A StatefulDataLoader of preference batches (see preference_collate_fn for the keys).

    The shuffle order depends only on `seed` and the epoch (SeededShuffleSampler), not on
    data.num_workers, and the global torch RNG is not touched. `state_dict()` taken mid-epoch
    and loaded into a loader built with the same arguments continues with exactly the next
    batch.

    Args:
        dataset: the tokenised pairs.
        tokenizer: gives pad_token_id, which right-pads input_ids.
        data_config: the `data` section (num_workers, pad_to_multiple_of).
        num_pairs: pairs per batch (a batch has 2 * num_pairs rows).
        shuffle: reshuffle every epoch (training: data.shuffle); False keeps dataset order.
        seed: seeds the shuffle (dpo.seed).
        drop_last: drop the last partial batch (training); validation keeps it and pads it
            with pad_batch_to.

    Returns:
        The dataloader.
    """
    return stateful_loader(
        dataset,
        partial(
            preference_collate_fn,
            pad_token_id=_pad_token_id(tokenizer),
            pad_to_multiple_of=data_config["pad_to_multiple_of"],
        ),
        num_workers=data_config["num_workers"],
        batch_size=num_pairs,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )


def build_sft_dataloader(
    dataset: SFTSequenceDataset,
    tokenizer: PreTrainedTokenizerBase,
    data_config: SFTDataConfig,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
) -> StatefulDataLoader:
    """A StatefulDataLoader of SFT batches (see sft_collate_fn for the keys).

    Shuffled and resumable exactly as build_dataloader's preference batches.

    Args:
        dataset: the tokenised sequences (SFTSequenceDataset).
        tokenizer: gives pad_token_id, which right-pads input_ids.
        data_config: the `data` section (num_workers, pad_to_multiple_of).
        batch_size: sequences per batch.
        shuffle: reshuffle every epoch (training: data.shuffle); False keeps dataset order.
        seed: seeds the shuffle (sft.seed).
        drop_last: drop the last partial batch (training); validation keeps it and pads it
            with pad_batch_to.

    Returns:
        The dataloader.
    """
    return stateful_loader(
        dataset,
        partial(
            sft_collate_fn,
            pad_token_id=_pad_token_id(tokenizer),
            pad_to_multiple_of=data_config["pad_to_multiple_of"],
        ),
        num_workers=data_config["num_workers"],
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )


def build_prompt_dataloader(
    dataset: TokenizedPromptDataset,
    tokenizer: PreTrainedTokenizerBase,
    data_config: PromptDataConfig,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
) -> StatefulDataLoader:
    """A StatefulDataLoader of prompt batches (see prompt_collate_fn for the keys).

    Shuffled and resumable exactly as build_dataloader's preference batches: `state_dict()`
    taken mid-epoch and loaded into a loader built with the same arguments continues with
    exactly the next batch of prompts.

    Args:
        dataset: the tokenised prompts (TokenizedPromptDataset).
        tokenizer: gives pad_token_id, which right-pads input_ids.
        data_config: the `data` section (num_workers).
        batch_size: prompts per batch (before repeat_prompts makes G rows of each).
        shuffle: reshuffle every epoch (training: data.shuffle); False keeps dataset order.
        seed: seeds the shuffle (the recipe's seed).
        drop_last: drop the last partial batch (training); validation keeps it.

    Returns:
        The dataloader.
    """
    return stateful_loader(
        dataset,
        partial(prompt_collate_fn, pad_token_id=_pad_token_id(tokenizer)),
        num_workers=data_config["num_workers"],
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. the EOS token)")
    return tokenizer.pad_token_id


def stateful_loader(
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable[[list[dict[str, Any]]], Any] | None,
    *,
    num_workers: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
) -> StatefulDataLoader:
    """A StatefulDataLoader of any dataset with the seeded, resumable shuffle
    (SeededShuffleSampler) and worker seeds that leave the global RNG alone."""
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededShuffleSampler(len(cast(Sized, dataset)), seed) if shuffle else None,
        # worker seeds are drawn from this generator rather than the global RNG
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn,
    )
