"""Looking at processes from tests (Linux /proc): trees, command lines, environments, liveness."""

import os
import signal
import time
from pathlib import Path

from rl_toolkit.distributed.ray_watchdog import descendants, process_table


def tree(pid: int) -> dict[int, int]:
    """`pid`'s descendants (pid -> start time), without `pid` itself."""
    table = process_table()
    if pid not in table:
        return {}
    return {p: start for p, start in descendants({pid: table[pid][1]}, table).items() if p != pid}


def cmdline(pid: int) -> str:
    """The command line (Ray's processes rewrite it to their title, e.g. `ray::_WorkerActor`)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def environ(pid: int) -> str:
    """The environment the process started with, `NAME=value` entries separated by NUL."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def running(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` is a live process (not a zombie), and the one started at `start_time`."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z" and (start_time is None or int(fields[19]) == start_time)


def wait_until_gone(processes: dict[int, int], timeout_s: float) -> dict[int, int]:
    """Wait for the processes (pid -> start time) to end; those still running after the time."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {pid: start for pid, start in processes.items() if running(pid, start)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_all(processes: dict[int, int]) -> None:
    """SIGKILL those of the processes still running (a test's own clean-up)."""
    for pid, start in processes.items():
        if running(pid, start):
            os.kill(pid, signal.SIGKILL)
