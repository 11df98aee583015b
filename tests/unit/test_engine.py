"""The engine with user-written modules: what each rank's steps get, colocation and offloading,
parameter syncs, resume after a failure, and the one-line errors.

The modules (tests/unit/engine_modules.py) log every call to one file; the tests read it.
"""

import json
from pathlib import Path

import pytest

import rl_toolkit
from rl_toolkit import DPOEngine, Engine, RLHFEngine
from rl_toolkit.distributed.worker_groups import WorkerError
from rl_toolkit.engine import EngineError, MegatronModule
from rl_toolkit.utils.config import ConfigError
from tests.unit.engine_modules import (
    NoDataset,
    OldStyleTrainer,
    Reference,
    Reward,
    Sampler,
    Trainer,
    Value,
)

REPO = Path(__file__).resolve().parents[2]
NUM_ITEMS = 12

# Each engine start builds 8 worker processes; slow on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(900)


def init(tmp_path: Path, log: Path, *overrides: str, fail_at: int | None = None) -> dict:
    args = f"{{log: {log}" + (f", fail_at_iteration: {fail_at}}}" if fail_at is not None else "}")
    two, one = f"{{num_workers: 2, args: {args}}}", f"{{num_workers: 1, args: {args}}}"
    return rl_toolkit.init(
        REPO / "configs" / "engine.yaml",
        f"models={{policy: {two}, ppo_policy: {two}, reference: {one}, reward: {one}, "
        f"value: {one}, ppo_value: {one}}}",
        "runtime.num_episode=4",
        "runtime.sample_per_episode=4",  # 4 items -> 8 rows: one global batch an episode
        "runtime.generation_batch_size=2",
        "runtime.train_global_batch_size=8",
        "runtime.train_micro_batch_size=2",  # 2 micro-batches of 2 rows on each of 2 ranks
        "runtime.save_episode_interval=2",
        "runtime.eval_episode_interval=0",
        "runtime.colocation=[[policy, ppo_policy], [reference, reward, value, ppo_value]]",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
        f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard_enabled=false",
        *overrides,
    )


def rlhf_engine() -> RLHFEngine:
    """Six user modules; the policy trainer takes train_info, the value trainer iteration."""
    engine = RLHFEngine(
        Sampler("policy"), Reference("reference"), Reward("reward"), Value("value"),
        Trainer("ppo_policy"), OldStyleTrainer("ppo_value"),
    )  # fmt: skip
    engine.set_dataset(list(range(NUM_ITEMS)))
    return engine


def read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def events(lines: list[dict], module: str, event: str, rank: int | None = None) -> list[dict]:
    return [
        line for line in lines
        if line["module"] == module and line["event"] == event and rank in (None, line["rank"])
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(ray_session, tmp_path_factory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("straight")
    init(tmp_path, tmp_path / "log.jsonl")
    state = rlhf_engine().learn()
    assert state == {"episode": 4, "iteration": 4}
    return read(tmp_path / "log.jsonl")


def test_each_rank_gets_its_micro_batches_with_groups_whole(straight_run) -> None:
    for rank in (0, 1):
        steps = events(straight_run, "ppo_policy", "train", rank)
        assert [step["iteration"] for step in steps] == [0, 1, 2, 3]
        assert [step["episode"] for step in steps] == [0, 1, 2, 3]  # train_info
        assert all(step["sizes"] == [2, 2] and step["groups_whole"] for step in steps)
    for iteration in range(4):
        ids = [
            events(straight_run, "ppo_policy", "train", rank)[iteration]["ids"] for rank in (0, 1)
        ]
        flat = [i for rank_ids in ids for micro in rank_ids for i in micro]
        forward = [
            line["ids"] for line in events(straight_run, "policy", "forward")
            if line["iteration"] == iteration
        ]  # fmt: skip
        # The episode's items, each twice (G = 2), split over the ranks without overlap.
        assert sorted(flat) == sorted(i for batch in forward for i in batch for _ in range(2))


def test_the_inference_module_gets_the_trainers_weights(straight_run) -> None:
    trained = [step["hash"] for step in events(straight_run, "ppo_policy", "train", 0)]
    for line in events(straight_run, "policy", "forward"):
        if line["iteration"] > 0:  # generated after the sync of the previous episode
            assert line["hash"] == trained[line["iteration"] - 1]


def test_idle_colocated_modules_are_offloaded(straight_run) -> None:
    for index, line in enumerate(straight_run):
        if line["module"] == "ppo_policy" and line["event"] == "train":
            before = [
                e["event"] for e in straight_run[:index]
                if e["module"] == "policy" and e["rank"] == line["rank"]
            ]  # fmt: skip
            assert before[-1] == "offload", before
    # reference and reward share a group but have no weights: the default hooks do nothing.
    assert len(events(straight_run, "reward", "setup")) == 1


def test_a_failed_run_resumes_at_the_next_episode_with_the_same_data(
    straight_run, ray_session, tmp_path
) -> None:
    log = tmp_path / "log.jsonl"
    init(tmp_path, log, fail_at=3)  # dies in the 4th episode, after the checkpoint of the 2nd
    with pytest.raises(WorkerError, match="killed mid-episode"):
        rlhf_engine().learn()
    init(tmp_path, log, fail_at=3)
    assert rlhf_engine().learn() == {"episode": 4, "iteration": 4}
    lines = read(log)
    forwards = [(line["iteration"], line["ids"]) for line in events(lines, "policy", "forward", 0)]
    # First run: episodes 0, 1, 2, 3 (failing in training); the second resumes at episode 2.
    assert [iteration for iteration, _ in forwards] == [0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    straight = [
        (line["iteration"], line["ids"]) for line in events(straight_run, "policy", "forward", 0)
    ]
    assert forwards[8:] == straight[4:]
    final = events(lines, "ppo_policy", "train", 0)[-1]["hash"]
    assert final == events(straight_run, "ppo_policy", "train", 0)[-1]["hash"]


def test_both_train_step_signatures_and_the_rlhf_flow(straight_run) -> None:
    # ppo_value's train_step(data, iteration): the engine passes the iteration (its record
    # says episode -1, the OldStyleTrainer's marker); ppo_policy's gets train_info.
    value_steps = events(straight_run, "ppo_value", "train", 0)
    assert [(s["iteration"], s["episode"]) for s in value_steps] == [(i, -1) for i in range(4)]
    assert all(step["sizes"] == [2, 2, 2, 2] for step in value_steps)  # one rank: 8 rows
    # The reward module got the completions with the reference's and the value model's keys.
    keys = events(straight_run, "reward", "forward")[0]["keys"]
    assert {"id", "sample", "x", "score", "ref", "values"} <= set(keys)
    # The value model generates with its trainer's weights of the previous episode.
    trained = [step["hash"] for step in value_steps]
    for line in events(straight_run, "value", "forward"):
        if line["iteration"] > 0:
            assert line["hash"] == trained[line["iteration"] - 1]


def test_one_line_errors(ray_session, tmp_path) -> None:
    with pytest.raises(EngineError, match="Megatron-LM models are not supported"):
        MegatronModule("policy")
    init(tmp_path, tmp_path / "log.jsonl", "runtime.colocation=[]")
    engine = DPOEngine(NoDataset("reference"), Trainer("ppo_policy")).set_dataset([1, 2])
    with pytest.raises(
        EngineError, match=r"'reference' \(NoDataset\) must implement build_dataset"
    ) as error:
        engine.learn()
    assert "\n" not in str(error.value)

    stranger = Reward("reward")
    policy = Sampler("policy")
    flow_engine = Engine(
        [policy], flow=lambda batch: stranger.forward_step(policy.forward_step(batch)),
        trainers=[], dataset_module=policy,
    )  # fmt: skip
    with pytest.raises(
        EngineError, match=r"calls reward.forward_step\(\), but module 'reward' is not one"
    ):
        flow_engine.set_dataset(list(range(4))).learn()

    init(tmp_path, tmp_path / "log.jsonl", "runtime.colocation=[]")  # 2 + 2 + 4 x 1 > 4 CPUs
    with pytest.raises(EngineError, match=r"need 8 CPUs .* but the Ray cluster has 4"):
        rlhf_engine().learn()
    init(tmp_path, tmp_path / "log.jsonl", "runtime.colocation=[[policy, reward]]")
    with pytest.raises(EngineError, match=r"need the same models.<name>.num_workers"):
        rlhf_engine().learn()
    with pytest.raises(ConfigError, match="runtime.sample_per_episode=5 must be a multiple"):
        init(tmp_path, tmp_path / "log.jsonl", "runtime.sample_per_episode=5")
