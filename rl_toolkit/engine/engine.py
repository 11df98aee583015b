"""The engines: modules on workers, a flow that makes samples, trainers that learn from them.

    rl_toolkit.init()                the config (--config and dotted overrides) and Ray
    engine = DPOEngine(reference, policy_trainer)
    engine.set_dataset(prompts)      the first flow module's build_dataset makes the dataset
    engine.learn()
        start                        checks (one line, before any worker), one worker group per
                                     module on its colocation group's bundles, the dataset and
                                     its loader, resume from the last checkpoint
        for each episode             sample_per_episode items, generation_batch_size at a time,
                                     through the flow (module calls on the driver, run on the
                                     modules' workers) -> the replay sample manager -> every
                                     trainer's train_step on global batches of micro-batch lists
                                     -> parameter syncs -> evaluate, checkpoint, log

Flows run eagerly on the driver (ChatLearn traces them; the result is the same calls). The
engine is Ray's side of the toolkit: the modules' own code never sees Ray.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import ray
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from rl_toolkit.config_schema import EngineConfig, check_runtime_schedule, resolve_local_paths
from rl_toolkit.data.dataloader import stateful_loader
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster, init_ray
from rl_toolkit.engine.groups import ModuleGroup, as_batch
from rl_toolkit.engine.module import BaseModule, EngineError, ModuleWorker
from rl_toolkit.utils.checkpoint import (
    CheckpointManager,
    load_dataloader_state,
    load_rng_state,
    save_dataloader_state,
    save_rng_state,
)
from rl_toolkit.utils.config import (
    ConfigError,
    LoadedConfig,
    ReportedError,
    TypedDictClass,
    apply_override,
    load_yaml_with_defaults,
    parse_cli,
    resolve_interpolations,
    save_config,
    validate_config,
)
from rl_toolkit.utils.logger import Logger

# ---------------------------------------------------------------------------------------------
# init


class _Initialized(TypedDict):
    config: dict[str, Any]
    sources: dict[str, str]


_initialized: _Initialized | None = None


def init(
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    *overrides: str,
    default: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Read the config and start (or attach to) Ray; the engines use this config.

    Args:
        config: a YAML file, or a config already loaded; None reads `--config <file>` and
            `dotted.key=value` overrides from the command line (like `chatlearn.init()`).
        *overrides: dotted overrides applied after the file's (when `config` is given).
        default: the file used when the command line has no `--config`.

    Returns:
        The config (plain dicts); `runtime`, `models`, `cluster`, `checkpointing` and `logger`
        are checked here, the other sections by the modules that read them.

    Afterwards a ConfigError (a user mistake) that reaches the top of the script is printed as
    one line and exits with status 2; a ReportedError (a worker's failure) as its message, 1.
    """
    global _initialized
    if config is None:
        if default is None and "--config" not in sys.argv:
            raise ConfigError("rl_toolkit.init(): no config; pass --config <file.yaml>")
        path, cli = parse_cli(sys.argv[1:], str(default), "An rl_toolkit engine run")
        loaded = _load(path, [*cli, *overrides])
    elif isinstance(config, Mapping):
        loaded = LoadedConfig(resolve_interpolations(dict(config)), {})
    else:
        loaded = _load(config, list(overrides))
    values = loaded.values
    engine_sections = {key: values[key] for key in EngineConfig.__annotations__ if key in values}
    validate_config(engine_sections, EngineConfig, loaded.sources)
    check_runtime_schedule(values["runtime"])
    if "policy" in values and "data" in values:
        resolve_local_paths(values)  # type: ignore[arg-type]  # the built-in modules' paths
    sys.excepthook = _one_line_errors
    init_ray()
    _initialized = {"config": values, "sources": loaded.sources}
    return values


def _load(path: str | os.PathLike, overrides: Sequence[str]) -> LoadedConfig:
    loaded = load_yaml_with_defaults(path)
    for override in overrides:
        apply_override(loaded, override)
    return LoadedConfig(resolve_interpolations(loaded.values), loaded.sources)


def _one_line_errors(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
    """sys.excepthook: a user mistake or a reported failure as its message alone."""
    if not isinstance(error, ConfigError | ReportedError):
        sys.__excepthook__(kind, error, traceback)
        return
    print(f"error: {error}", file=sys.stderr, flush=True)
    if ray.is_initialized():
        ray.shutdown()
    os._exit(2 if isinstance(error, ConfigError) else 1)


def get_args() -> dict[str, Any]:
    """The config `init` read (ChatLearn's `get_args`)."""
    if _initialized is None:
        raise EngineError("call rl_toolkit.init() before building or running an engine")
    return _initialized["config"]


def check_sections(config: Mapping[str, Any], schema: TypedDictClass) -> None:
    """Check the sections of `config` that `schema` names (a module's part of the config)
    against it; errors name the file each value came from."""
    sources = _initialized["sources"] if _initialized is not None else {}
    annotations: Mapping[str, Any] = getattr(schema, "__annotations__", {})
    validate_config({key: config[key] for key in annotations if key in config}, schema, sources)


# ---------------------------------------------------------------------------------------------
# The engine


class EngineSaveState(TypedDict):
    """Where training stands; saved in every checkpoint's training_info.json."""

    episode: int  # episodes done
    iteration: int  # train_step calls done (global batches, all trainers together)


Flow = Callable[[BatchedDataDict], BatchedDataDict]
EvalFlow = Callable[[BatchedDataDict], dict[str, float]]


class Engine:
    """Modules, the flow that makes an episode's samples, and the modules that train on them.

    Args:
        modules: every module the flows use, each with its `models.<name>` config entry.
        flow: one generation batch (the dataset's collated items) -> samples (rows), by calling
            modules' `forward_step`.
        trainers: modules whose `train_step` learns from the samples, in this order.
        dataset_module: the module whose `build_dataset` makes the data (the flow's first).
        eval_flow: one evaluation batch -> metrics (means over its rows), or None.
        name: the engine's name in logs.
    """

    def __init__(
        self,
        modules: Sequence[BaseModule],
        *,
        flow: Flow,
        trainers: Sequence[BaseModule],
        dataset_module: BaseModule,
        eval_flow: EvalFlow | None = None,
        name: str = "engine",
    ) -> None:
        names = [module.name for module in modules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise EngineError(f"{name}: module names must be unique; {duplicates} appear twice")
        self.name = name
        self.modules = {module.name: module for module in modules}
        self.flow, self.eval_flow = flow, eval_flow
        self.trainers = list(trainers)
        self.dataset_module = dataset_module
        self._prompts: Any = None
        self._eval_prompts: Any = None
        self._syncs: list[tuple[BaseModule, BaseModule]] = []
        self._replay: Callable[[BatchedDataDict], BatchedDataDict] | None = None
        self.groups: dict[str, ModuleGroup] = {}
        self._clusters: list[RayVirtualCluster] = []
        self.last_eval: dict[str, float] = {}  # the latest evaluation's metrics (checkpoints)

    def set_dataset(self, prompts: Any) -> Engine:
        """The training data, as `build_dataset` of the dataset module takes it."""
        self._prompts = prompts
        return self

    def set_eval_dataset(self, prompts: Any) -> Engine:
        """The evaluation data (`build_dataset(prompts, is_eval=True)`)."""
        self._eval_prompts = prompts
        return self

    def set_parameter_sync(self, src: BaseModule, dst: BaseModule) -> Engine:
        """After each episode's training, `dst` (e.g. the policy that generates) gets the
        weights of `src` (its trainer)."""
        self._syncs.append((src, dst))
        return self

    def set_replay_sample_manager(self, fn: Callable[[BatchedDataDict], BatchedDataDict]) -> None:
        """`fn(samples) -> samples` runs on the driver between the flow and the trainers (e.g.
        advantages over the whole episode)."""
        self._replay = fn

    # ----- learn -----

    def learn(self) -> EngineSaveState:
        """Run `runtime.num_episode` episodes (from the last checkpoint's next one, when
        resuming); returns where training stands."""
        config = get_args()
        self._check(config)
        checkpointer = CheckpointManager(config["checkpointing"])
        state: EngineSaveState = {"episode": 0, "iteration": 0}
        resume = checkpointer.resume_path
        if resume is not None:
            info = checkpointer.load_training_info(resume)
            state = {"episode": info["episode"], "iteration": info["iteration"]}
            print(f"Resuming from {resume} (episode {state['episode']})")
        torch.manual_seed(config["runtime"]["seed"])
        logger = Logger(config["logger"], resume_step=state["episode"] if resume else None)
        logger.log_hyperparams(config)
        try:
            self._start(config)
            loader = self._loader(self._prompts, config, is_eval=False)
            eval_loader = None
            if self._eval_prompts is not None and self.eval_flow is not None:
                eval_loader = self._loader(self._eval_prompts, config, is_eval=True)
            if resume is not None:
                self._load(resume, loader)
            self._episodes(config, state, loader, eval_loader, checkpointer, logger)
        finally:
            logger.close()
            self.shutdown()
        return state

    def _episodes(
        self,
        config: Mapping[str, Any],
        state: EngineSaveState,
        loader: StatefulDataLoader,
        eval_loader: StatefulDataLoader | None,
        checkpointer: CheckpointManager,
        logger: Logger,
    ) -> None:
        runtime = config["runtime"]
        if eval_loader is not None and runtime["eval_at_start"] and state["episode"] == 0:
            self._evaluate(eval_loader, 0, logger)
        batches = _endless(loader)
        while state["episode"] < runtime["num_episode"]:
            episode = state["episode"]
            samples = self._make_samples(batches, runtime, episode)
            metrics = self._train(samples, runtime, state)
            self._sync_parameters()
            state["episode"] += 1
            for group in self.groups.values():
                metrics |= {f"{group.module.name}/{k}": v for k, v in group.metrics().items()}
            logger.log_metrics(metrics, state["episode"], prefix="train")
            logger.print_metrics(_shown(metrics), state["episode"], prefix="train")
            is_last = state["episode"] == runtime["num_episode"]
            eval_every, save_every = (
                runtime["eval_episode_interval"],
                runtime["save_episode_interval"],
            )
            if (
                eval_loader is not None
                and eval_every
                and (is_last or state["episode"] % eval_every == 0)
            ):
                self._evaluate(eval_loader, state["episode"], logger)
            if (
                checkpointer.enabled
                and save_every
                and (is_last or state["episode"] % save_every == 0)
            ):
                self._save(checkpointer, loader, state, config)

    # ----- start -----

    def _check(self, config: Mapping[str, Any]) -> None:
        """Every mistake in how the engine is put together, before any worker starts."""
        models = config["models"]
        for module in self.modules.values():
            if module.name not in models:
                raise EngineError(
                    f"{self.name}: module {module.name!r} has no entry models.{module.name} in "
                    f"the config (its num_workers and args); configured: {sorted(models)}"
                )
            module._config = config
        for group in config["runtime"]["colocation"]:
            for name in group:
                if name not in self.modules:
                    raise EngineError(
                        f"runtime.colocation names {name!r}, which is not one of the engine's "
                        f"modules {sorted(self.modules)}"
                    )
        if type(self.dataset_module).build_dataset is BaseModule.build_dataset:
            raise EngineError(
                f"{self.name}: module {self.dataset_module.name!r} "
                f"({type(self.dataset_module).__name__}) must implement build_dataset(prompts, "
                "is_eval=False): the engine builds the training data with it"
            )
        if self._prompts is None:
            raise EngineError(f"{self.name}: no data; call engine.set_dataset(prompts) first")
        for module in self.modules.values():
            module.check_args()
        _check_fits(self._placement_groups(config), config)

    def _placement_groups(self, config: Mapping[str, Any]) -> list[list[str]]:
        """The colocation groups, and each module in none as a group of its own."""
        colocated = [list(group) for group in config["runtime"]["colocation"] if group]
        placed = {name for group in colocated for name in group}
        return colocated + [[name] for name in self.modules if name not in placed]

    def _start(self, config: Mapping[str, Any]) -> None:
        """One cluster per colocation group, one worker group per module on it."""
        cluster_config = config["cluster"]
        for names in self._placement_groups(config):
            num_workers = config["models"][names[0]]["num_workers"]
            cluster = RayVirtualCluster(
                [num_workers],
                use_gpus=True,  # falls back to CPU bundles without GPUs
                num_gpus_per_node=max(num_workers, 1),
                name=f"{self.name}-{'-'.join(names)}",
                max_colocated_worker_groups=len(names),
            )
            self._clusters.append(cluster)
            for name in names:
                self.groups[name] = ModuleGroup(
                    self.modules[name], cluster, config,
                    timeout_s=cluster_config["worker_timeout_s"],
                    env_vars=cluster_config["worker_env_vars"],
                )  # fmt: skip
            for name in names:
                self.groups[name].peers = [self.groups[n] for n in names if n != name]

    def _loader(
        self, prompts: Any, config: Mapping[str, Any], *, is_eval: bool
    ) -> StatefulDataLoader:
        runtime = config["runtime"]
        group = self.groups[self.dataset_module.name]
        dataset = group.workers.one(0, ModuleWorker.build_dataset, prompts, is_eval)
        if not isinstance(dataset, torch.utils.data.Dataset) or not hasattr(dataset, "__len__"):
            raise EngineError(
                f"{self.dataset_module.name}.build_dataset returned {type(dataset).__name__}; "
                "expected a torch.utils.data.Dataset with __len__ and a collate_fn attribute"
            )
        return stateful_loader(
            dataset,
            getattr(dataset, "collate_fn", None),
            num_workers=0,
            batch_size=runtime["generation_batch_size"],
            shuffle=runtime["shuffle"] and not is_eval,
            seed=runtime["seed"],
            drop_last=not is_eval,
        )

    # ----- an episode -----

    def _make_samples(
        self, batches: Iterator[Any], runtime: Mapping[str, Any], episode: int
    ) -> BatchedDataDict:
        for group in self.groups.values():
            group.iteration = episode
        outputs = []
        for _ in range(runtime["sample_per_episode"] // runtime["generation_batch_size"]):
            outputs.append(as_batch(self.flow(as_batch(next(batches)))))
        pad_values: dict[str, int | float] = {}
        for group in self.groups.values():
            pad_values |= group.pad_values
        samples = BatchedDataDict.from_batches(outputs, pad_value_dict=pad_values)
        return self._replay(samples) if self._replay is not None else samples

    def _train(
        self, samples: BatchedDataDict, runtime: Mapping[str, Any], state: EngineSaveState
    ) -> dict[str, float]:
        gbs, mbs = runtime["train_global_batch_size"], runtime["train_micro_batch_size"]
        if samples.size % gbs:
            raise EngineError(
                f"an episode made {samples.size} samples (rows), not a multiple of "
                f"runtime.train_global_batch_size={gbs}; change runtime.sample_per_episode or "
                "the batch size"
            )
        metrics: dict[str, float] = {}
        for _ in range(runtime["num_training_epoch"]):
            for start in range(0, samples.size, gbs):
                batch = samples.slice(start, start + gbs)
                for trainer in self.trainers:
                    group = self.groups[trainer.name]
                    group.activate()
                    results = group.train(
                        batch, mbs, iteration=state["iteration"], episode=state["episode"]
                    )
                    metrics |= _rank_mean(trainer.name, results)
                state["iteration"] += 1
        return metrics

    def _sync_parameters(self) -> None:
        for src, dst in self._syncs:
            source, target = self.groups[src.name], self.groups[dst.name]
            parameters = source.workers.all(ModuleWorker.parameters_to_sync)[0]
            assert parameters is not None, "rank 0 returns the weights"
            target.workers.all(ModuleWorker.load_synced_parameters, parameters)

    def parameter_hash(self, module: BaseModule) -> str:
        """sha256 of a running module's full weights (e.g. to check a parameter sync)."""
        digest = self.groups[module.name].workers.all(ModuleWorker.parameter_hash)[0]
        assert digest is not None, "rank 0 returns the hash"
        return digest

    def _evaluate(self, eval_loader: StatefulDataLoader, episode: int, logger: Logger) -> None:
        assert self.eval_flow is not None, "an eval loader exists only with an eval flow"
        for group in self.groups.values():
            group.iteration = episode
        totals: dict[str, float] = {}
        num_rows = 0
        for batch in eval_loader:
            batch = as_batch(batch)
            metrics = self.eval_flow(batch)
            num_rows += batch.size
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) * batch.size
        means = {key: value / num_rows for key, value in totals.items()}
        logger.log_metrics(means, episode, prefix="validation")
        logger.print_metrics(means, episode, prefix="validation")
        self.last_eval = means

    # ----- checkpoints -----

    def _save(
        self,
        checkpointer: CheckpointManager,
        loader: StatefulDataLoader,
        state: EngineSaveState,
        config: Mapping[str, Any],
    ) -> Path:
        tmp = checkpointer.begin(state["episode"])
        for name, group in self.groups.items():
            group.workers.all(ModuleWorker.save_checkpoint, str(tmp / name))
        save_dataloader_state(tmp, loader.state_dict())
        save_rng_state(tmp)
        save_config(config, tmp / "config.yaml")
        info = {**state, **{f"val_{k}": v for k, v in self.last_eval.items()}}
        return checkpointer.finalize(tmp, state["episode"], info)

    def _load(self, checkpoint: Path, loader: StatefulDataLoader) -> None:
        for name, group in self.groups.items():
            group.workers.all(ModuleWorker.load_checkpoint, str(checkpoint / name))
        loader.load_state_dict(load_dataloader_state(checkpoint))
        load_rng_state(checkpoint)

    def shutdown(self) -> None:
        """Stop every module's workers and free their bundles (idempotent)."""
        for group in self.groups.values():
            try:
                group.shutdown()
            except Exception as error:  # noqa: BLE001 - the others are stopped all the same
                print(f"warning: stopping {group.module.name} failed: {error}", file=sys.stderr)
        for cluster in self._clusters:
            cluster.shutdown()
        self.groups, self._clusters = {}, []


def _endless(loader: StatefulDataLoader) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (each epoch reshuffled by its sampler)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise EngineError(
                "the dataset has fewer items than runtime.generation_batch_size: no batch"
            )


def _shown(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics the console shows (all go to metrics.jsonl): not the counts."""
    counts = ("num_", "global_num_", "rows")
    return {k: v for k, v in metrics.items() if not k.rpartition("/")[2].startswith(counts)}


def _rank_mean(name: str, results: list[Any]) -> dict[str, float]:
    """A trainer's metrics, `name/key`, averaged over the ranks that returned them."""
    metrics: dict[str, list[float]] = {}
    for result in results:
        for key, value in (result or {}).items():
            metrics.setdefault(key, []).append(float(value))
    return {f"{name}/{key}": sum(values) / len(values) for key, values in metrics.items()}


def _check_fits(groups: list[list[str]], config: Mapping[str, Any]) -> None:
    """The colocation groups' members agree on their workers, and all groups fit the cluster."""
    models = config["models"]
    for names in groups:
        sizes = {name: models[name]["num_workers"] for name in names}
        if len(set(sizes.values())) > 1:
            raise EngineError(
                f"runtime.colocation group {names}: its modules share workers' devices, so they "
                f"need the same models.<name>.num_workers; got {sizes}"
            )
    needed = sum(models[names[0]]["num_workers"] for names in groups)
    resources = ray.cluster_resources()
    kind = "GPU" if resources.get("GPU", 0) > 0 else "CPU"
    have = int(resources.get(kind, 0))
    if needed > have:
        layout = ", ".join(f"{'+'.join(n)}: {models[n[0]]['num_workers']}" for n in groups)
        raise EngineError(
            f"the modules need {needed} {kind}s ({layout}) but the Ray cluster has {have}; "
            "colocate modules (runtime.colocation) or lower models.<name>.num_workers"
        )
