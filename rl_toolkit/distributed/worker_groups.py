"""RayWorkerGroup: one Ray actor per bundle of a RayVirtualCluster, and dispatch to them.

The worker itself is a plain Python class (its `__init__` takes keyword arguments); it can be
built and tested without Ray. Here it is wrapped in a thin actor that builds it inside its own
process after putting the torch.distributed rendezvous variables (RANK, WORLD_SIZE,
LOCAL_RANK, NODE_RANK, MASTER_ADDR, MASTER_PORT) into that process's environment, so the
worker calls `torch.distributed.init_process_group(init_method="env://")` as under torchrun.
Credentials the worker needs (HF_TOKEN, ...) go into that environment the same way: as an
argument of the build call, which Ray does not log, unlike a runtime_env.
"""

import contextlib
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, Generic, NamedTuple, ParamSpec, TypeVar

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import BundleInfo, RayVirtualCluster, worker_env
from rl_toolkit.utils.config import ReportedError

W = TypeVar("W")  # the worker class
P = ParamSpec("P")  # a worker method's parameters after self (and the data, for `sharded`)
R = TypeVar("R")  # its return type
V = TypeVar("V")  # the per-rank value of `per_rank`

# After a first failure, how long to wait for other workers' failures (see get_results).
FAILURE_GRACE_S = 3.0

# A WorkerError shows at most this many lines of its cause (the end of a remote traceback, where
# the exception is) and names at most this many other failed or silent workers: it must stay
# readable with hundreds of workers. The full cause is in `WorkerError.cause`.
MAX_CAUSE_LINES = 12
MAX_WORKERS_LISTED = 4

# Ray colours the remote traceback for terminals; the error message should be plain text.
_ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")
# Python's markers under the failing expression of a traceback line: no room for them.
_MARKER_LINE = re.compile(r"^\s*[~^]+\s*$")


class WorkerError(RuntimeError, ReportedError):
    """A worker raised, its process died, or it did not answer in time. The message names the
    worker, its node, the method and the cause (the end of the remote traceback); the original
    Ray error is in `cause`."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


def _cause_lines(error: ray.exceptions.RayError) -> list[str]:
    """The error's text (for a remote exception its traceback), indented, at most
    MAX_CAUSE_LINES lines: the end, where the exception is."""
    text = _ANSI_COLOR.sub("", str(error)).strip()
    lines = [line for line in text.splitlines() if not _MARKER_LINE.match(line)]
    if len(lines) > MAX_CAUSE_LINES:
        num_left_out = len(lines) - MAX_CAUSE_LINES + 1
        lines = [
            f"... ({num_left_out} lines left out; WorkerError.cause has them all)",
            *lines[-(MAX_CAUSE_LINES - 1) :],
        ]
    return [f"  {line}" for line in lines]


def _listed(items: list[str]) -> list[str]:
    """`items` indented, one a line, at most MAX_WORKERS_LISTED of them and a count of the rest."""
    lines = [f"  {item}" for item in items[:MAX_WORKERS_LISTED]]
    if len(items) > MAX_WORKERS_LISTED:
        lines.append(f"  ... and {len(items) - MAX_WORKERS_LISTED} more")
    return lines


class WorkerFuture(NamedTuple):
    """A pending call on one worker; pass a list of them to `RayWorkerGroup.get_results`."""

    rank: int
    method: str
    ref: ray.ObjectRef


class _WorkerActor:
    """The actor body: builds the plain worker in the actor's process and forwards calls.

    Built in two steps so that all actors start (and import torch) in parallel: the actors are
    asked for their pid and a free port (rank 0's is the rendezvous port) before any worker
    exists.
    """

    def __init__(self) -> None:
        self.worker = None

    def pid_and_free_port(self) -> tuple[int, int]:
        # Port 0 lets the OS pick a free port; it is released again for rank 0's rendezvous.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            return os.getpid(), sock.getsockname()[1]

    def build_worker(
        self,
        worker_cls: type,
        worker_kwargs: dict[str, Any],
        env: dict[str, str],
        num_threads: int | None,
    ) -> None:
        # The worker reads RANK & co. from the environment, as under torchrun, and its
        # credentials (HF_TOKEN) as the libraries it uses expect them.
        os.environ.update(env)
        if num_threads is not None:
            # OMP_NUM_THREADS is in the actor's runtime env too, for OpenMP users other than
            # torch; torch's own pool is sized here.
            torch.set_num_threads(num_threads)
        self.worker = worker_cls(**worker_kwargs)

    def call(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)


# Ray types the handle `.remote()` returns as "the handle or the class" (ray.actor.ActorProxy):
# a method then has no `.remote` (typed for @ray.method ones only) and ray.kill refuses it; the
# `type: ignore`s on those calls below are for that alone.
_RemoteWorkerActor = ray.remote(_WorkerActor)


def _rank_env(bundles: list[BundleInfo], master_port: int) -> list[dict[str, str]]:
    """torch.distributed env vars per rank (bundles in rank order, grouped by node)."""
    node_ranks = {node_id: i for i, node_id in enumerate(dict.fromkeys(b.node_id for b in bundles))}
    envs, num_seen_on_node = [], dict.fromkeys(node_ranks, 0)
    for rank, bundle in enumerate(bundles):
        envs.append(
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(len(bundles)),
                "LOCAL_RANK": str(num_seen_on_node[bundle.node_id]),
                "NODE_RANK": str(node_ranks[bundle.node_id]),
                "MASTER_ADDR": bundles[0].node_ip,
                "MASTER_PORT": str(master_port),
            }
        )
        num_seen_on_node[bundle.node_id] += 1
    return envs


class RayWorkerGroup(Generic[W]):
    """One actor per bundle of `cluster`, with rank = position in `cluster.get_bundles()`.

    Calls name the worker's method itself, not a string: `group.all(PolicyWorker.save, path)`,
    `group.sharded(PolicyWorker.train, batch, loss_fn)`; a type checker and an IDE follow them
    from the driver to the worker.

    Args:
        cluster: the virtual cluster whose bundles host the workers.
        worker_cls: a plain class; each actor builds `worker_cls(**worker_kwargs)`.
        name_prefix: worker names are `f"{name_prefix}-{rank}"` (used in error messages).
        worker_kwargs: keyword arguments of `worker_cls.__init__`.
        timeout_s: how long `get_results` waits for a call (building the workers included)
            before it raises WorkerError naming the workers that did not answer; None: forever.
        env_vars: driver environment variables the workers get besides the allow-list of
            `virtual_cluster.worker_env`; credentials among them travel in the build call.

    CPU workers run with `OMP_NUM_THREADS=1` and `torch.set_num_threads(1)`: one CPU per actor.
    GPU workers see only their GPU (Ray sets CUDA_VISIBLE_DEVICES), i.e. device `cuda:0`.
    Construction returns once every worker's `__init__` has finished; if one fails, all are
    killed and WorkerError is raised. `worker_pids` holds each worker's process id (named in
    error messages, for `py-spy dump --pid` on its node).
    """

    def __init__(
        self,
        cluster: RayVirtualCluster,
        worker_cls: type[W],
        *,
        name_prefix: str,
        worker_kwargs: dict[str, Any] | None = None,
        timeout_s: float | None,
        env_vars: list[str],
    ) -> None:
        self.worker_cls = worker_cls
        self.timeout_s = timeout_s
        # Set when a call failed, timed out or was abandoned: the workers may be dead or stuck
        # (e.g. in a collective with a dead peer), so only `shutdown()` is safe.
        self.broken = False
        self.bundles = cluster.get_bundles()
        if not self.bundles:
            raise ValueError(f"RayWorkerGroup {name_prefix!r}: the cluster has been shut down")
        self.world_size = len(self.bundles)
        self.worker_names = [f"{name_prefix}-{rank}" for rank in range(self.world_size)]
        self.worker_pids: list[int | None] = [None] * self.world_size
        env = worker_env(env_vars)
        num_threads = None if cluster.use_gpus else 1
        self._actors = [
            _RemoteWorkerActor.options(
                **self._actor_options(cluster, bundle, env.plain, num_threads)
            ).remote()
            for bundle in self.bundles
        ]
        try:
            self._build_workers(worker_kwargs or {}, env.credentials, num_threads)
        except WorkerError:
            self.shutdown()  # the others may be blocked in init_process_group
            raise

    def _build_workers(
        self, worker_kwargs: dict[str, Any], credentials: dict[str, str], num_threads: int | None
    ) -> None:
        started = self.get_results(
            [
                WorkerFuture(rank, "__init__", actor.pid_and_free_port.remote())  # type: ignore[attr-defined]
                for rank, actor in enumerate(self._actors)
            ]
        )
        self.worker_pids = [pid for pid, _ in started]
        # The rendezvous port is rank 0's: it must be free on the rank-0 node.
        envs = _rank_env(self.bundles, master_port=started[0][1])
        build_args = (self.worker_cls, worker_kwargs)
        futures = [
            WorkerFuture(
                rank,
                "__init__",
                actor.build_worker.remote(*build_args, {**credentials, **env}, num_threads),  # type: ignore[attr-defined]
            )
            for rank, (actor, env) in enumerate(zip(self._actors, envs, strict=True))
        ]
        self.get_results(futures)

    @staticmethod
    def _actor_options(
        cluster: RayVirtualCluster,
        bundle: BundleInfo,
        env_vars: dict[str, str],
        num_threads: int | None,
    ) -> dict[str, Any]:
        if num_threads is not None:
            env_vars = {**env_vars, "OMP_NUM_THREADS": str(num_threads)}
        # Colocated groups split a bundle: on GPUs each actor has a CPU of its own and a share
        # of the GPU; on CPUs a share of the bundle's one CPU (colocated groups take turns).
        share = 1 / cluster.max_colocated_worker_groups
        return {
            "num_cpus": 1 if cluster.use_gpus else share,
            "num_gpus": share if cluster.use_gpus else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=bundle.placement_group,
                placement_group_bundle_index=bundle.bundle_index,
            ),
            # Set when the worker process starts, before torch or transformers read them.
            "runtime_env": {"env_vars": env_vars},
        }

    def _method_name(self, method: Callable[..., Any]) -> str:
        name = getattr(method, "__name__", "")
        if getattr(self.worker_cls, name, None) is not method:
            raise ValueError(f"{method!r} is not a method of {self.worker_cls.__name__}")
        return name

    def _call(self, rank: int, method: str, args: tuple, kwargs: dict[str, Any]) -> WorkerFuture:
        assert self._actors, "the worker group has been shut down"
        ref = self._actors[rank].call.remote(method, args, kwargs)  # type: ignore[attr-defined]
        return WorkerFuture(rank, method, ref)

    def all_async(
        self, method: Callable[Concatenate[W, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> list[WorkerFuture]:
        """Like `all`, without waiting: futures in rank order, for `get_results`."""
        name = self._method_name(method)
        return [self._call(rank, name, args, kwargs) for rank in range(self.world_size)]

    def all(
        self, method: Callable[Concatenate[W, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> list[R]:
        """Call `method(*args, **kwargs)` on every worker, e.g. `group.all(W.save, path)`.

        Args:
            method: a method of the worker class, as an attribute of the class (so that a type
                checker follows the call to it and checks the arguments).
            *args, **kwargs: its arguments, the same for every worker.

        Returns:
            The workers' return values in rank order.
        """
        return self.get_results(self.all_async(method, *args, **kwargs))

    def one(
        self, rank: int, method: Callable[Concatenate[W, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Call `method(*args, **kwargs)` on worker `rank` alone (a call that is not collective,
        e.g. building a dataset) and return its value."""
        return self.get_results([self._call(rank, self._method_name(method), args, kwargs)])[0]

    def per_rank(
        self,
        method: Callable[Concatenate[W, V, P], R],
        values: list[V],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> list[R]:
        """Call `method(values[i], *args, **kwargs)` on worker i, e.g. a handle for each GPU.

        Args:
            method: a method of the worker class whose first argument is the per-rank value.
            values: one value per worker, in rank order.
            *args, **kwargs: the further arguments, the same for every worker.

        Returns:
            The workers' return values in rank order.
        """
        name = self._method_name(method)
        if len(values) != self.world_size:
            raise ValueError(
                f"per_rank: {len(values)} values for {self.world_size} workers of "
                f"{self.worker_cls.__name__}"
            )
        futures = [
            self._call(rank, name, (value, *args), kwargs) for rank, value in enumerate(values)
        ]
        return self.get_results(futures)

    def free_port(self, rank: int) -> tuple[str, int]:
        """An address on worker `rank`'s node with a port free there now, for a group the
        worker hosts (e.g. a NCCL group with another worker group)."""
        assert self._actors, "the worker group has been shut down"
        future = WorkerFuture(rank, "free_port", self._actors[rank].pid_and_free_port.remote())  # type: ignore[attr-defined]
        _, port = self.get_results([future])[0]
        return self.bundles[rank].node_ip, port

    def sharded(
        self,
        method: Callable[Concatenate[W, BatchedDataDict, P], R],
        data: BatchedDataDict,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> list[R]:
        """Call `method(shard_i, *args, **kwargs)` on worker i, e.g. `group.sharded(W.train, b)`.

        Args:
            method: a method of the worker class whose first argument is the data.
            data: the batch, split into `world_size` shards of whole groups, balanced and in
                order (`BatchedDataDict.shard_by_batch_size`).
            *args, **kwargs: the further arguments, the same for every worker.

        Returns:
            The workers' return values in rank order.
        """
        name = self._method_name(method)
        shards = data.shard_by_batch_size(self.world_size)
        futures = [
            self._call(rank, name, (shard, *args), kwargs) for rank, shard in enumerate(shards)
        ]
        return self.get_results(futures)

    def get_results(self, futures: list[WorkerFuture]) -> list[Any]:
        """Wait for `futures` and return their values in the order given.

        Waits on all of them at once, so a failure is reported as soon as it happens, even
        while other workers are still blocked (e.g. in a collective with the dead one). After
        the first failure it waits FAILURE_GRACE_S more for other failures, because a peer's
        death makes the survivors' collectives fail too, sometimes before Ray reports the
        death itself: the death is then named as the cause. Workers that have not answered
        after `timeout_s` (stopped, hung, or waiting for one that is) are a failure too.

        Raises:
            WorkerError: a worker raised, died or did not answer in time. The group is then
                `broken` and the others are left as they are (call `shutdown()` to stop them).
        """
        try:
            return self._wait(futures)
        except BaseException:
            # Failed, timed out or interrupted (Ctrl-C): workers may still be busy with it.
            self.broken = True
            raise

    def _wait(self, futures: list[WorkerFuture]) -> list[Any]:
        by_ref = {future.ref: future for future in futures}
        values: dict[ray.ObjectRef, Any] = {}
        failures: list[tuple[WorkerFuture, ray.exceptions.RayError]] = []
        pending = list(by_ref)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        timeout: float | None
        while pending:
            if failures:
                timeout = FAILURE_GRACE_S
            else:
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready and failures:
                break  # the grace period after a failure is over
            if not ready:
                raise self._timeout_error([by_ref[ref] for ref in pending])
            try:
                values[ready[0]] = ray.get(ready[0])
            except ray.exceptions.RayError as error:
                failures.append((by_ref[ready[0]], error))
        if failures:
            raise self._worker_error(failures) from None
        return [values[future.ref] for future in futures]

    def _worker(self, rank: int) -> str:
        bundle, pid = self.bundles[rank], self.worker_pids[rank]
        pid_part = f", pid {pid}" if pid is not None else ""
        return (
            f"Worker {self.worker_names[rank]} (rank {rank} of {self.world_size}{pid_part}) "
            f"on node {bundle.node_ip} (node id {bundle.node_id})"
        )

    def _method(self, future: WorkerFuture) -> str:
        return f"{self.worker_cls.__name__}.{future.method}()"

    def _describe(self, future: WorkerFuture, error: ray.exceptions.RayError) -> str:
        what = "died" if isinstance(error, ray.exceptions.RayActorError) else "raised"
        return f"{self._worker(future.rank)} {what} in {self._method(future)}"

    def _worker_error(
        self, failures: list[tuple[WorkerFuture, ray.exceptions.RayError]]
    ) -> WorkerError:
        # A dead process is the likelier root cause than an exception (often a failed
        # collective with the dead peer); otherwise the first failure in time.
        deaths = [f for f in failures if isinstance(f[1], ray.exceptions.RayActorError)]
        future, error = (deaths or failures)[0]
        lines = [f"{self._describe(future, error)}:", *_cause_lines(error)]
        others = [self._describe(*failure) for failure in failures if failure[0] != future]
        if others:
            lines += ["Other workers failed as well (see their logs):", *_listed(others)]
        return WorkerError("\n".join(lines), error)

    def _timeout_error(self, silent: list[WorkerFuture]) -> WorkerError:
        summary = (
            f"{len(silent)} worker(s) did not answer within {self.timeout_s:g} s (the worker "
            "timeout, cluster.worker_timeout_s); each is stopped, hung, or waiting for one that is:"
        )
        where = [f"{self._worker(future.rank)} in {self._method(future)}" for future in silent]
        message = "\n".join([summary, *_listed(where)])
        return WorkerError(message, ray.exceptions.GetTimeoutError(message))

    def shutdown(self) -> None:
        """Kill the workers (idempotent); their bundles stay reserved in the cluster."""
        for actor in self._actors:
            ray.kill(actor, no_restart=True)  # type: ignore[arg-type]
        self._actors = []


@contextlib.contextmanager
def shut_down_at_exit(*shutdowns: Callable[[], None]) -> Iterator[None]:
    """Call `shutdowns` (e.g. `policy.shutdown`, `cluster.shutdown`) when the block ends.

    After a failure they are best effort: an error while cleaning up is a one-line warning, so
    that the failure that stopped the run is what the user reads.
    """
    try:
        yield
    except BaseException:
        for shutdown in shutdowns:
            try:
                shutdown()
            except Exception as error:  # noqa: BLE001 - reported, and the first error goes on
                first_line = str(error).partition("\n")[0]
                print(f"warning: {shutdown.__qualname__} failed: {first_line}", file=sys.stderr)
        raise
    for shutdown in shutdowns:
        shutdown()
