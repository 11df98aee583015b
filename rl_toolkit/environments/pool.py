"""A pool of processes that call one function, one call at a time each, with a per-call timeout.

concurrent.futures' ProcessPoolExecutor cannot stop a call: a hung call keeps its process busy
for good, and killing that process breaks the whole executor (BrokenProcessPool). Here every
process serves one call at a time over its own pipe, so a call past its deadline is ended by
killing its process, which is replaced while the others go on (the failure mode of verl #5839:
one math_verify call that never returns stalls the run).

Processes are started by multiprocessing's "forkserver": a fork of a process with threads (a
Ray actor, a torch program) can deadlock, and "spawn" imports the main module again in every new
process (seconds for a driver script, paid again for each replacement); the fork server imports
it once and forks every process from its single thread. So the function must be picklable: a
module-level function, or a functools.partial of one. A process counts as started once it has
loaded the function; only then does it get calls, so an import's time never counts against a
call's timeout.
"""

import contextlib
import multiprocessing
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Literal, NamedTuple, cast

# How long a new process may take to import and load the function before the pool gives up.
STARTUP_TIMEOUT_S = 300.0


class Outcome(NamedTuple):
    """How one call ended: "ok" (value: the return value), "error" (value: "Type: message" of
    the exception, or of the process's death) or "timeout" (value: None)."""

    status: Literal["ok", "error", "timeout"]
    value: Any


class PoolStartError(RuntimeError):
    """A process of the pool could not load the function, or did not start in time."""


def _serve(conn: Connection, fn_bytes: bytes) -> None:
    """A pool process: load the function, say "ready", then answer calls until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        fn = pickle.loads(fn_bytes)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("start_error", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        index, args = task
        try:
            outcome = Outcome("ok", fn(*args))
        except BaseException as error:  # noqa: BLE001 - SystemExit too: the call failed, not us
            outcome = Outcome("error", f"{type(error).__name__}: {error}")
        try:
            conn.send((index, outcome))
        except Exception as error:  # noqa: BLE001 - e.g. a value pickle cannot write
            conn.send((index, Outcome("error", f"returned a value that cannot be sent ({error})")))


@dataclass
class _Slot:
    """One process of the pool and the call it is running (task None: idle)."""

    process: BaseProcess
    conn: Connection
    started_at: float
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0


class TimeoutPool:
    """`num_processes` processes that each run `fn(*args)` for one call at a time.

    Args:
        fn: a picklable callable (module-level function, or a partial of one).
        num_processes: calls run in parallel.
        timeout_s: how long one call may run; past it its process is killed and replaced, and
            the call's outcome is "timeout".

    Raises:
        PoolStartError: a process could not unpickle `fn` (e.g. its module does not import
            there) or did not start within STARTUP_TIMEOUT_S.
    """

    def __init__(self, fn: Callable[..., Any], *, num_processes: int, timeout_s: float) -> None:
        assert num_processes >= 1 and timeout_s > 0
        self._fn_bytes = pickle.dumps(fn)  # fails here, in the caller, for a lambda
        self._timeout_s = timeout_s
        self._context = multiprocessing.get_context("forkserver")
        self._slots = [self._start_process() for _ in range(num_processes)]
        self._wait_until_started()

    def _start_process(self) -> _Slot:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(child_conn, self._fn_bytes), daemon=True
        )
        process.start()
        child_conn.close()  # the child's end lives in the child: its exit closes the pipe
        return _Slot(process, parent_conn, started_at=time.monotonic())

    def _wait_until_started(self) -> None:
        outcomes: list[Outcome | None] = []
        while not all(slot.ready for slot in self._slots):
            self._wait_once(outcomes)

    def map(self, calls: list[tuple[Any, ...]]) -> list[Outcome]:
        """Run `fn(*args)` for every `args` of `calls`, in parallel; the outcomes in order.

        Returns within about `timeout_s` of the slowest call's start; a call that raises or
        whose process dies is an "error" outcome, and the pool stays usable after either.
        """
        assert self._slots, "the pool is closed"
        outcomes: list[Outcome | None] = [None] * len(calls)
        queue = deque(range(len(calls)))
        while queue or any(slot.task is not None for slot in self._slots):
            for position, slot in enumerate(self._slots):
                if slot.ready and slot.task is None and queue:
                    self._send(position, queue, calls)
            self._wait_once(outcomes)
        assert all(outcome is not None for outcome in outcomes)
        return cast(list[Outcome], outcomes)

    def _send(self, position: int, queue: deque[int], calls: list[tuple[Any, ...]]) -> None:
        """Give the next call of `queue` to the idle process at `position`."""
        slot, index = self._slots[position], queue.popleft()
        try:
            slot.conn.send((index, calls[index]))
        except OSError:  # the process died while idle (e.g. killed for memory): replace it
            queue.appendleft(index)
            self._replace(position)
            return
        slot.task, slot.deadline = index, time.monotonic() + self._timeout_s

    def _wait_once(self, outcomes: list[Outcome | None]) -> None:
        """Wait for the next message or deadline, then handle what happened."""
        now = time.monotonic()
        deadlines = [slot.deadline for slot in self._slots if slot.task is not None]
        deadlines += [s.started_at + STARTUP_TIMEOUT_S for s in self._slots if not s.ready]
        timeout = max(min(deadlines) - now, 0.0) if deadlines else None
        readable = wait([slot.conn for slot in self._slots], timeout)
        for position, slot in enumerate(self._slots):
            if slot.conn in readable:
                self._receive(position, slot, outcomes)
        now = time.monotonic()
        for position, slot in enumerate(self._slots):
            if slot.task is not None and now >= slot.deadline:
                outcomes[slot.task] = Outcome("timeout", None)
                self._replace(position)
            elif not slot.ready and now >= slot.started_at + STARTUP_TIMEOUT_S:
                self.close()
                raise PoolStartError(
                    f"a scoring process did not load its function within {STARTUP_TIMEOUT_S:g} s"
                )

    def _receive(self, position: int, slot: _Slot, outcomes: list[Outcome | None]) -> None:
        try:
            message = slot.conn.recv()
        except (EOFError, OSError):  # the process died
            slot.process.join()
            death = f"the scoring process died (exit code {slot.process.exitcode})"
            if not slot.ready:
                self.close()
                raise PoolStartError(f"{death} while loading its function") from None
            if slot.task is not None:
                outcomes[slot.task] = Outcome("error", death)
            self._replace(position)
            return
        kind, value = message
        if kind == "ready":
            slot.ready = True
        elif kind == "start_error":
            self.close()
            raise PoolStartError(f"a scoring process could not load its function: {value}")
        else:
            outcomes[kind] = value
            slot.task = None

    def _replace(self, position: int) -> None:
        """Kill the process at `position` (hung, or already dead) and start another there."""
        slot = self._slots[position]
        slot.process.kill()
        slot.process.join()
        slot.conn.close()
        self._slots[position] = self._start_process()

    def close(self) -> None:
        """Stop every process (idle ones exit at once, busy ones are killed); idempotent."""
        for slot in self._slots:
            with contextlib.suppress(OSError):  # already closed, or the process is gone
                slot.conn.send(None)
        for slot in self._slots:
            slot.process.join(timeout=1.0)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
        self._slots = []
