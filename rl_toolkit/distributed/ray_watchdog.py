"""Kill what is left of a local Ray instance as soon as the driver that started it dies.

Ray ties the processes it starts from the driver (GCS, raylet, monitor, ...) to the driver with
PR_SET_PDEATHSIG, but not the ones the raylet starts: when the driver is killed (SIGKILL, the
OOM killer), the dashboard and runtime-env agents spend a minute trying to report the raylet's
death to the dead GCS, and workers started in the meantime linger too. This watchdog, started by
`init_ray` next to a local Ray instance, follows the process trees of Ray's processes while the
driver lives and kills every process left in them once the driver is gone, which it learns from
its stdin (a pipe from the driver) reaching end of file. Linux only: it reads /proc.

    python rl_toolkit/distributed/ray_watchdog.py ROOT_PID [ROOT_PID ...]
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

# How often the trees are scanned for new processes. A process started after the last scan and
# before the driver's death is missed; Ray's workers exit by themselves when their raylet dies.
POLL_INTERVAL_S = 1.0

# pid -> (parent pid, start time in clock ticks since boot): the start time tells a process
# from a later one that reuses its pid.
ProcessTable = dict[int, tuple[int, int]]


def process_table() -> ProcessTable:
    """Every process on the machine, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # The command name (field 2) is in parentheses and may hold spaces or parentheses.
        fields = stat.rpartition(")")[2].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def own_child_pids() -> set[int]:
    """The direct children of this process."""
    return {child for child, (parent, _) in process_table().items() if parent == os.getpid()}


def descendants(tracked: dict[int, int], table: ProcessTable) -> dict[int, int]:
    """The processes of `tracked` (pid -> start time) still running, plus all their descendants.

    A process whose parent died stays in the result if it was tracked before: it has been
    reparented (to init), but it still belongs to the tree.
    """
    alive = {
        pid: start for pid, start in tracked.items() if pid in table and table[pid][1] == start
    }
    children = defaultdict(list)
    for pid, (parent, _) in table.items():
        children[parent].append(pid)
    todo = list(alive)
    while todo:
        for child in children[todo.pop()]:
            if child not in alive:
                alive[child] = table[child][1]
                todo.append(child)
    return alive


def start(root_pids: set[int], env: dict[str, str]) -> subprocess.Popen:
    """Start a watchdog over the trees of `root_pids`; it acts when this process dies.

    Args:
        root_pids: the processes whose trees to kill.
        env: the watchdog's environment.

    Returns:
        The watchdog. Keep it referenced for as long as this process lives: closing its stdin
        (which garbage collection does) is the signal to kill.
    """
    return subprocess.Popen(
        # Run as a file, not with -m: no package import, nothing but the standard library.
        [sys.executable, __file__, *map(str, sorted(root_pids))],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        # Its own session: a Ctrl-C or a signal to the driver's process group must not stop it
        # before the driver is gone.
        start_new_session=True,
    )


def _kill(tracked: dict[int, int]) -> None:
    for pid in descendants(tracked, process_table()):
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> None:
    """Follow the trees of the pids in `argv` until stdin closes, then kill them."""
    table = process_table()
    tracked = {pid: table[pid][1] for pid in map(int, argv) if pid in table}
    driver_gone = threading.Event()

    def wait_for_eof() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        driver_gone.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    while not driver_gone.wait(POLL_INTERVAL_S):
        tracked = descendants(tracked, process_table())
    _kill(tracked)


if __name__ == "__main__":
    main(sys.argv[1:])
