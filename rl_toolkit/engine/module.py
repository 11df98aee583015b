"""Modules: the user's models, written as classes with a few step methods, run by an engine.

A module is built twice. On the driver, `PolicyTrainer("ppo_policy")` is a light spec: a name
and, later, the handle of its workers. On each of its workers (one process per device, a Ray
actor) the engine builds the module again from that spec and calls `setup()` there, with the
process group already up; `forward_step`, `train_step` and `eval_step` run there, on the
worker's shard of the data. Called on the driver (inside a flow), `forward_step` and
`eval_step` are sent to the workers: the input dicts are merged, split over the data-parallel
ranks (groups whole), and the ranks' outputs are concatenated in row order.

The method names and signatures follow ChatLearn's module API (seeds 000 and 001).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from rl_toolkit.utils.config import ConfigError

if TYPE_CHECKING:
    from rl_toolkit.engine.groups import ModuleGroup

# The step methods a flow may call on the driver; each is sent to the module's workers.
DISPATCHED = ("forward_step", "eval_step")


class EngineError(ConfigError):
    """A mistake in how modules, flows and the engine are put together; one line."""


class _Placement:
    """What a module knows about where it runs, set by its worker before `setup`."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size


class BaseModule:
    """A model (or any computation) the engine runs on its own workers.

    Subclasses implement `setup` and the steps their role needs: `forward_step` for inference
    (policy generation, reference, reward, value), `train_step` for trainers, `eval_step` for
    evaluation, `build_dataset` for the module that the engine builds the data with.

    Args:
        name: the module's name: its `models.<name>` entry in the config, the folder of its
            checkpoints, the prefix of its logs. Unique within an engine.
        args: the module's arguments, overriding `models.<name>.args` of the config key by key.
    """

    def __init__(self, name: str, args: Mapping[str, Any] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise EngineError(f"{type(self).__name__}(name=...): a module needs a non-empty name")
        self._name = name
        self._explicit_args = dict(args or {})
        self._placement: _Placement | None = None  # set on the worker
        self._config: Mapping[str, Any] | None = None  # set by the engine, on the driver too
        self._group: ModuleGroup | None = None  # set on the driver by a running engine
        self._metrics: dict[str, float] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in DISPATCHED:
            if method in cls.__dict__:
                setattr(cls, method, _dispatched(method, cls.__dict__[method]))

    # ----- what a module is told -----

    @property
    def name(self) -> str:
        """The module's name (its `models.<name>` config entry)."""
        return self._name

    @property
    def global_args(self) -> Mapping[str, Any]:
        """The whole config given to `rl_toolkit.init` (e.g. the `policy` section)."""
        if self._config is None:
            raise EngineError(f"module {self._name!r}: its config is known once an engine holds it")
        return self._config

    @property
    def runtime_args(self) -> Mapping[str, Any]:
        """The config's `runtime` section (episodes, batch sizes, intervals)."""
        return self.global_args["runtime"]

    @property
    def model_args(self) -> dict[str, Any]:
        """`models.<name>.args` of the config, updated with the `args` given to the module."""
        configured = self.global_args["models"][self._name]["args"]
        return {**configured, **self._explicit_args}

    @property
    def data_parallel_rank(self) -> int:
        """This worker's rank among the module's workers."""
        return self._where().rank

    @property
    def data_parallel_size(self) -> int:
        """The number of the module's workers (`models.<name>.num_workers`)."""
        return self._where().world_size

    @property
    def is_last_rank(self) -> bool:
        return self.data_parallel_rank == self.data_parallel_size - 1

    def _where(self) -> _Placement:
        if self._placement is None:
            raise EngineError(
                f"module {self._name!r}: its ranks exist only on its workers, once the engine "
                "has started them (in setup() and the step methods)"
            )
        return self._placement

    # ----- what a module implements -----

    def check_args(self) -> None:
        """Check the config this module reads, on the driver, before any worker starts; raise
        ConfigError (one line). Built-in modules check their sections here."""

    def setup(self) -> None:
        """Build the model, optimizer and whatever the steps need (on each worker)."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        """One inference pass over this worker's shard; returns new keys, one value per row
        (or, for generation, the rows it made)."""
        raise EngineError(f"module {self._name!r} ({type(self).__name__}) has no forward_step")

    def train_step(self, data: list[dict[str, Any]], iteration: int) -> dict[str, float] | None:
        """One optimizer step; `data` is this rank's micro-batches of one global batch. The
        second parameter may be named `train_info` instead: it then gets
        `{"iteration": ..., "episode": ...}`. Returns metrics (or None)."""
        raise EngineError(f"module {self._name!r} ({type(self).__name__}) has no train_step")

    def eval_step(self, data: dict[str, Any]) -> dict[str, Any]:
        """One evaluation pass over this worker's shard; returns new keys, as forward_step."""
        raise EngineError(f"module {self._name!r} ({type(self).__name__}) has no eval_step")

    def build_dataset(self, prompts: Any, is_eval: bool = False) -> torch.utils.data.Dataset:
        """The engine's dataset from what `engine.set_dataset` got: a torch Dataset whose
        `collate_fn` attribute batches its items into a dict (None: torch's default)."""
        raise EngineError(f"module {self._name!r} ({type(self).__name__}) has no build_dataset")

    def save_checkpoint(self, path: str) -> None:
        """Write this module's state under `path` (a folder; every worker calls it)."""

    def load_checkpoint(self, path: str) -> None:
        """Read what `save_checkpoint` wrote under `path` (every worker calls it)."""

    def onload(self) -> None:
        """Bring the module's state back to its device before it is used again."""

    def offload(self) -> None:
        """Free the device for the modules colocated with this one while it is idle."""

    def parameters_to_sync(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) weights, by name, on rank 0 ({} elsewhere): what a parameter
        sync sends from this module. Every worker calls it (gathering may be collective)."""
        raise EngineError(f"module {self._name!r} ({type(self).__name__}) has no weights to sync")

    def load_synced_parameters(self, parameters: dict[str, torch.Tensor]) -> None:
        """Take the full weights a parameter sync sent (every worker gets all of them)."""
        raise EngineError(f"module {self._name!r} ({type(self).__name__}) cannot take weights")

    def add_metrics(self, metrics: Mapping[str, float]) -> None:
        """Record metrics for the engine's log (collected after each episode)."""
        self._metrics.update(metrics)

    def get_and_clear_metrics(self) -> dict[str, float]:
        """The metrics recorded since the last call."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    # ----- pickling: the driver's spec travels to the workers without its handle -----

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_group"] = None
        return state


class TorchModule(BaseModule):
    """A module on torch.distributed: the process group of its workers (gloo on CPU, NCCL on
    GPU) is up before `setup`, so `setup` may build an FSDP2 model on it. Set `self.model`
    (an nn.Module) in `setup` and the defaults below work: onload/offload move it between the
    GPU and host memory, checkpoints and parameter syncs are its full state dict."""

    model: torch.nn.Module | None = None

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise EngineError(
                f"module {self.name!r} ({type(self).__name__}): set self.model in setup(), or "
                "override this method"
            )
        return self.model

    def parameters_to_sync(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return cast(dict[str, torch.Tensor], get_model_state_dict(self._model(), options=options))

    def load_synced_parameters(self, parameters: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self._model(), dict(parameters), options=options)

    def save_checkpoint(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": self._model().state_dict()}, checkpoint_id=path)

    def load_checkpoint(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        state = {"model": self._model().state_dict()}
        dcp.load(state, checkpoint_id=path)
        self._model().load_state_dict(state["model"])

    def onload(self) -> None:
        if torch.cuda.is_available() and self.model is not None:
            self.model.to(torch.device("cuda", torch.cuda.current_device()))

    def offload(self) -> None:
        if torch.cuda.is_available() and self.model is not None:
            self.model.to("cpu")
            torch.cuda.empty_cache()


class MegatronModule(BaseModule):
    """ChatLearn's name for Megatron-LM models; rl_toolkit runs torch models (FSDP2) only."""

    def __init__(self, name: str, args: Mapping[str, Any] | None = None) -> None:
        raise EngineError(
            f"MegatronModule({name!r}): Megatron-LM models are not supported by rl_toolkit; "
            "subclass TorchModule (FSDP2) or use the built-in modules of rl_toolkit.engine"
        )


def _dispatched(method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as it runs on a worker; on the driver, a call of it on the module's workers."""

    @functools.wraps(fn)
    def step(self: BaseModule, *args: Any, **kwargs: Any) -> Any:
        if self._placement is not None:  # on a worker: the step itself
            return fn(self, *args, **kwargs)
        if self._group is None:
            raise EngineError(
                f"a flow calls {self.name}.{method}(), but module {self.name!r} is not one of "
                "the running engine's modules; pass it to the engine"
            )
        return self._group.dispatch(method, args, kwargs)

    return step


def takes_train_info(module: BaseModule) -> bool:
    """Whether `train_step`'s second parameter is `train_info` (else it is the iteration)."""
    parameters = list(inspect.signature(module.train_step).parameters)
    return len(parameters) >= 2 and parameters[1] == "train_info"


def state_dict_hash(parameters: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes and bytes), e.g. to compare weights."""
    digest = hashlib.sha256()
    for name in sorted(parameters):
        tensor = parameters[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class ModuleWorker:
    """The worker hosting one module on one rank: a plain class, built in a Ray actor by the
    module's worker group. It joins the module's process group (TorchModule), places the module
    and calls its `setup`, then forwards the engine's calls."""

    def __init__(self, *, module: BaseModule, config: Mapping[str, Any]) -> None:
        if isinstance(module, TorchModule):
            from rl_toolkit.models.fsdp.init import init_distributed

            init_distributed()
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            import os

            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        module._placement, module._config = _Placement(rank, world_size), config
        self.module = module
        module.setup()

    def pad_values(self) -> dict[str, int | float]:
        """Padding per key of the module's outputs (e.g. the pad token for input_ids)."""
        return dict(getattr(self.module, "pad_values", {}))

    def step(self, data: dict[str, Any], method: str, kwargs: dict[str, Any]) -> Any:
        """Run `forward_step` or `eval_step` on this worker's shard."""
        assert method in DISPATCHED, method
        return getattr(self.module, method)(data, **kwargs)

    def train_step(self, data: list[dict[str, Any]], iteration: int, episode: int) -> Any:
        if takes_train_info(self.module):
            module: Any = self.module  # its train_step's second parameter is train_info
            return module.train_step(data, {"iteration": iteration, "episode": episode})
        return self.module.train_step(data, iteration)

    def build_dataset(self, prompts: Any, is_eval: bool) -> torch.utils.data.Dataset:
        return self.module.build_dataset(prompts, is_eval=is_eval)

    def save_checkpoint(self, path: str) -> None:
        self.module.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.module.load_checkpoint(path)

    def onload(self) -> None:
        self.module.onload()

    def offload(self) -> None:
        self.module.offload()

    def parameters_to_sync(self) -> dict[str, torch.Tensor] | None:
        parameters = self.module.parameters_to_sync()
        return parameters if self.module.data_parallel_rank == 0 else None

    def load_synced_parameters(self, parameters: dict[str, torch.Tensor]) -> None:
        self.module.load_synced_parameters(parameters)

    def parameter_hash(self) -> str | None:
        """sha256 of the module's full weights on rank 0 (None elsewhere); collective."""
        parameters = self.module.parameters_to_sync()
        return state_dict_hash(parameters) if self.module.data_parallel_rank == 0 else None

    def get_and_clear_metrics(self) -> dict[str, float]:
        return self.module.get_and_clear_metrics()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
