"""Wall-clock time per phase of a training step, and throughput."""

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timer:
    """Sums wall-clock seconds per phase label until the totals are popped.

    Usage, once per step in the recipe:

        with timer.time("training"):
            policy.train(batch, loss_fn)
        logger.log_metrics(timer.pop_totals(), step, prefix="timing")
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}

    @contextmanager
    def time(self, label: str) -> Iterator[None]:
        """Add the time spent inside the `with` block to `label` (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._totals[label] = self._totals.get(label, 0.0) + time.perf_counter() - start

    def total(self, label: str) -> float:
        """Seconds summed under `label` since the last `pop_totals`.

        Raises:
            KeyError: nothing was timed under `label`.
        """
        return self._totals[label]

    def pop_totals(self) -> dict[str, float]:
        """Return the seconds per label (in order of first use) and start over from zero."""
        totals, self._totals = self._totals, {}
        return totals


def tokens_per_second(num_tokens: int, seconds: float) -> float:
    """Throughput of a phase; 0.0 when no time was measured (e.g. a clock too coarse)."""
    return num_tokens / seconds if seconds > 0 else 0.0
