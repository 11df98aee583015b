"""Training logs: console progress, metrics.jsonl (always), TensorBoard and wandb (optional).

Every metric goes to `<log_dir>/metrics.jsonl`, one JSON object per line:

    {"step": 12, "prefix": "train", "loss": 0.41, "accuracy": 0.87, "tokens_per_second": 5120.0}

`prefix` is "train", "validation" or "timing" (seconds per phase). A run appends to the file.
A run that resumes from the checkpoint of step N (`Logger(..., resume_step=N)`) first removes
the lines of the steps after N, which a killed run logged after its last checkpoint and which
the resumed run redoes, so every step appears once; `read_metrics` still lets a later line of a
step win over an earlier one. TensorBoard and wandb get the same values under
"<prefix>/<name>"; TensorBoard hides the events of the removed steps (`purge_step`).
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from rl_toolkit.config_schema import LoggerConfig, WandbConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # generated samples of RL validations (log_samples)
_RESERVED_KEYS = ("step", "prefix")


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """`name value | name value` for one console line: 4 significant digits, or a whole
    number from 1000 up (throughputs read better as 51234 than as 5.123e+04)."""
    parts = []
    for name, value in metrics.items():
        number = float(value)
        parts.append(f"{name} {number:.0f}" if abs(number) >= 1000 else f"{name} {number:.4g}")
    return " | ".join(parts)


def _to_number(name: str, value: Any) -> float | int | bool:
    """A metric as a plain Python number; one-element tensors and NumPy scalars included."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and getattr(value, "size", None) == 1:  # a NumPy scalar
        return value.item()
    raise ValueError(f"metric {name!r} must be a number or a one-element tensor, got {value!r}")


class Logger:
    """Writes metrics to every enabled backend and shows a progress line on the console.

    Args:
        config: the `logger` section of the config.
        resume_step: the step of the checkpoint a resumed run starts from (None for a fresh
            run): the lines of later steps are removed from metrics.jsonl and their
            TensorBoard events hidden, since the run logs those steps again.
    """

    def __init__(self, config: LoggerConfig, *, resume_step: int | None = None) -> None:
        self.log_dir = Path(config["log_dir"])
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.log_dir / METRICS_FILE
        self.samples_path = self.log_dir / SAMPLES_FILE
        for path in (self.metrics_path, self.samples_path):
            _terminate_last_line(path)
            if resume_step is not None:
                _drop_steps_after(path, resume_step)
        self._tensorboard = None
        if config["tensorboard_enabled"]:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(
                log_dir=str(self.log_dir / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
            )
        self._console = Console(highlight=False, emoji=False)
        self._wandb_run = self._start_wandb(config["wandb"]) if config["wandb_enabled"] else None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._total_steps = 0

    def _start_wandb(self, config: WandbConfig) -> Any:
        """Start a wandb run whose files go to `<log_dir>/wandb`; print where to find it."""
        import wandb

        # wandb's own banner has emoji and sparklines; we print a plain line instead.
        run = wandb.init(
            project=config["project"],
            name=config["name"],
            dir=str(self.log_dir),
            settings=wandb.Settings(silent=True),
        )
        if run.offline:
            sync_dir = run.settings.sync_dir
            self._print(f"wandb: offline run in {sync_dir}; upload it with `wandb sync {sync_dir}`")
        else:
            self._print(f"wandb: run {config['name']} at {run.url}")
        return run

    def log_metrics(self, metrics: Mapping[str, Any], step: int, prefix: str) -> None:
        """Append one line to metrics.jsonl and send the values to TensorBoard and wandb.

        Args:
            metrics: name -> number (Python number, NumPy scalar or one-element tensor).
            step: the training step the values belong to.
            prefix: "train", "validation" or "timing".

        Raises:
            ValueError: a value is not a number, or a name is "step" or "prefix".
        """
        values = {name: _to_number(name, value) for name, value in metrics.items()}
        clash = [name for name in _RESERVED_KEYS if name in values]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in {self.metrics_path}")
        line = json.dumps({"step": step, "prefix": prefix, **values}) + "\n"
        _append_line(self.metrics_path, line)
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({f"{prefix}/{n}": v for n, v in values.items()}, step=step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        """Show a few generated samples: one line each on the console, appended to
        samples.jsonl, and a wandb table.

        Args:
            samples: one dict a sample, e.g. prompt, completion and reward (JSON values).
            step: the training step they were generated at.
        """
        for sample in samples:
            _append_line(self.samples_path, json.dumps({"step": step, **sample}) + "\n")
            self._print(f"[sample] step {step} | " + " | ".join(
                f"{key} {value!r}" for key, value in sample.items()
            ))  # fmt: skip
        if self._wandb_run is not None and samples:
            import wandb

            columns = list(samples[0])
            table = wandb.Table(
                columns=list[str | int](columns),
                data=[[str(s[c]) for c in columns] for s in samples],
            )
            self._wandb_run.log({"validation/samples": table}, step=step)

    def log_hyperparams(self, config: Mapping[str, Any]) -> None:
        """Record the resolved config (a plain nested dict) in TensorBoard and wandb."""
        if self._tensorboard is not None:
            text = json.dumps(config, indent=2, default=str)
            # Markdown code block so that TensorBoard keeps the indentation.
            self._tensorboard.add_text("hyperparams", "```\n" + text + "\n```")
        if self._wandb_run is not None:
            self._wandb_run.config.update(dict(config), allow_val_change=True)

    def print_metrics(self, metrics: Mapping[str, Any], step: int, prefix: str) -> None:
        """Print one line, e.g. `[validation] step 10 | loss 0.4 | accuracy 0.9`."""
        self._print(f"[{prefix}] step {step} | {format_metrics(metrics)}")

    def start_progress(self, total_steps: int, initial: int) -> None:
        """Show progress towards `total_steps`, starting at `initial` (the resumed step).

        On a terminal this is a live line (rich); elsewhere (Slurm logs, pipes) each
        `update_progress` prints one plain line instead.
        """
        self._total_steps = total_steps
        if not self._console.is_terminal:
            return
        # Rich cuts a squeezed column with a non-ASCII ellipsis; folding onto a new line keeps
        # the console plain ASCII on narrow terminals.
        self._progress = Progress(
            TextColumn("step {task.completed}/{task.total}", table_column=Column(overflow="fold")),
            TaskProgressColumn(table_column=Column(overflow="fold")),
            TimeElapsedColumn(table_column=Column(overflow="fold")),
            TextColumn("eta", table_column=Column(overflow="fold")),
            TimeRemainingColumn(table_column=Column(overflow="fold")),
            TextColumn(
                "{task.fields[metrics]}", markup=False, table_column=Column(overflow="fold")
            ),
            console=self._console,
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=initial, metrics=""
        )
        self._progress.start()

    def update_progress(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Move the progress to `step` and show `metrics` (e.g. loss, accuracy, tokens/s)."""
        text = format_metrics(metrics)
        if self._progress is None:
            self._print(f"step {step}/{self._total_steps} | {text}")
            return
        assert self._task is not None, "start_progress sets both"
        self._progress.update(self._task, completed=step, metrics=text)

    def close(self) -> None:
        """Stop the progress display and flush and close TensorBoard and wandb."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def _print(self, line: str) -> None:
        # Through the progress console so that the line lands above a live progress bar.
        self._console.print(line, markup=False, soft_wrap=True)


def _append_line(path: Path, line: str) -> None:
    """Append a whole line with one write on an O_APPEND descriptor.

    A process killed at any moment leaves either the whole line or none of it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _terminate_last_line(path: Path) -> None:
    """End a last line cut short (full disk, power loss) so that new lines start clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            _append_line(path, "\n")


def _drop_steps_after(path: Path, step: int) -> None:
    """Remove the lines of steps after `step` from a metrics.jsonl, atomically.

    The kept lines go to a temporary file that is synced and renamed over `path`, so a kill
    leaves the old file or the new one. Lines that are not JSON are kept as they are.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _line_step(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _line_step(line: str) -> float:
    """The step of a metrics.jsonl line; -inf for a line that is not a metrics row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return float("-inf")
    return (
        row["step"] if isinstance(row, dict) and isinstance(row.get("step"), int) else float("-inf")
    )


def read_metrics(path: Path, prefix: str) -> dict[int, dict[str, Any]]:
    """Read the lines of one prefix from a metrics.jsonl.

    Args:
        path: the metrics.jsonl file.
        prefix: "train", "validation" or "timing".

    Returns:
        step -> values (without "step" and "prefix"), in step order; when a step appears
        more than once (a resumed run redoing steps), the last line wins.

    Raises:
        ValueError: a line that is not JSON, naming the file and line number.
    """
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not a JSON object ({e})") from e
            if row["prefix"] == prefix:
                rows[row["step"]] = {k: v for k, v in row.items() if k not in _RESERVED_KEYS}
    return dict(sorted(rows.items()))
