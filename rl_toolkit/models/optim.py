"""Optimizer and learning-rate scheduler, built from the config by class path.

The workers build them for their shards; the driver builds them once for a one-element
parameter (``check_optimizer_config``), so that a wrong class path, keyword or schedule is one
line on the driver, before any worker starts, instead of an error inside every worker.
"""

import importlib
from collections.abc import Iterable

import torch

from rl_toolkit.config_schema import CriticConfig, OptimizerConfig, SchedulerConfig
from rl_toolkit.utils.config import ConfigError


def build_optimizer(
    params: Iterable[torch.nn.Parameter], config: OptimizerConfig, *, section: str = "policy"
) -> torch.optim.Optimizer:
    """``<section>.optimizer.name(params, **<section>.optimizer.kwargs)``.

    Raises:
        ConfigError: the class cannot be imported or does not take the keywords.
    """
    optimizer_cls = _import_class(config["name"], f"{section}.optimizer.name")
    try:
        return optimizer_cls(params, **config["kwargs"])
    except (TypeError, ValueError, RuntimeError) as exc:  # a keyword it does not take, a range
        raise ConfigError(
            f"{section}.optimizer.kwargs do not fit {config['name']}: {exc}"
        ) from None


def build_scheduler(
    optimizer: torch.optim.Optimizer, entries: list[SchedulerConfig], *, section: str = "policy"
) -> torch.optim.lr_scheduler.LRScheduler:
    """One scheduler, or several chained with ``SequentialLR`` at the listed milestones.

    Raises:
        ConfigError: an entry with the wrong keys, a class that cannot be imported or does not
            take its kwargs, or milestones that do not match the schedulers.
    """
    for idx, entry in enumerate(entries):
        if set(entry) not in ({"name", "kwargs"}, {"milestones"}):
            raise ConfigError(
                f"{section}.scheduler[{idx}]: expected keys {{name, kwargs}} or {{milestones}}, "
                f"got {sorted(entry)}"
            )
    schedulers = [
        _build_one_scheduler(optimizer, entry, f"{section}.scheduler[{idx}]")
        for idx, entry in enumerate(entries)
        if "name" in entry
    ]
    milestones = [entry["milestones"] for entry in entries if "milestones" in entry]
    if len(schedulers) == 1 and not milestones:
        return schedulers[0]
    if not schedulers or len(milestones) != 1 or len(milestones[0]) != len(schedulers) - 1:
        raise ConfigError(
            f"{section}.scheduler: expected one or more {{name, kwargs}} entries and, with more "
            f"than one, a last {{milestones: [...]}} entry with one step per switch; got {entries}"
        )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones[0])


def _build_one_scheduler(
    optimizer: torch.optim.Optimizer, entry: SchedulerConfig, key: str
) -> torch.optim.lr_scheduler.LRScheduler:
    scheduler_cls = _import_class(entry["name"], f"{key}.name")
    try:
        return scheduler_cls(optimizer, **entry["kwargs"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}.kwargs do not fit {entry['name']}: {exc}") from None


def check_optimizer_config(config: CriticConfig, *, section: str = "policy") -> None:
    """Build the optimizer and scheduler of ``config`` (the `<section>` section) for one
    parameter, to catch config errors on the driver.

    Raises:
        ConfigError: as ``build_optimizer`` and ``build_scheduler``.
    """
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], config["optimizer"], section=section)
    build_scheduler(optimizer, config["scheduler"], section=section)


def _import_class(path: str, key: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(
            f"{key}: cannot import {path!r} (expected e.g. 'torch.optim.AdamW')"
        ) from None
