"""The engine with user-written modules: what each rank's steps get, colocation and offloading,
parameter syncs, resume after a failure, and the one-line errors.

The modules (tests/unit/engine_modules.py) log every call to one file; the tests read it.
"""

import json
from pathlib import Path

import pytest

import rl_toolkit
from rl_toolkit import DPOEngine, Engine, GRPOEngine
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
)

REPO = Path(__file__).resolve().parents[2]
NUM_ITEMS = 12


def init(tmp_path: Path, log: Path, *overrides: str, fail_at: int | None = None) -> dict:
    args = f"{{log: {log}" + (f", fail_at_iteration: {fail_at}}}" if fail_at is not None else "}")
    two, one = f"{{num_workers: 2, args: {args}}}", f"{{num_workers: 1, args: {args}}}"
    return rl_toolkit.init(
        REPO / "configs" / "engine.yaml",
        f"models={{policy: {two}, ppo_policy: {two}, reference: {one}, reward: {one}}}",
        "runtime.num_episode=4",
        "runtime.sample_per_episode=4",  # 4 items -> 8 rows: one global batch an episode
        "runtime.generation_batch_size=2",
        "runtime.train_global_batch_size=8",
        "runtime.train_micro_batch_size=2",  # 2 micro-batches of 2 rows on each of 2 ranks
        "runtime.save_episode_interval=2",
        "runtime.eval_episode_interval=0",
        "runtime.colocation=[[policy, ppo_policy], [reference, reward]]",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
        f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard_enabled=false",
        *overrides,
    )


def grpo_shaped_engine() -> GRPOEngine:
    engine = GRPOEngine(
        Sampler("policy"), Reference("reference"), Reward("reward"), Trainer("ppo_policy")
    )
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
    state = grpo_shaped_engine().learn()
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
        grpo_shaped_engine().learn()
    init(tmp_path, log, fail_at=3)
    assert grpo_shaped_engine().learn() == {"episode": 4, "iteration": 4}
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


def test_the_iteration_signature_and_a_dpo_shaped_flow(ray_session, tmp_path) -> None:
    log = tmp_path / "log.jsonl"
    init(tmp_path, log, "runtime.num_episode=1", "runtime.train_global_batch_size=4",
         "runtime.colocation=[[reference, ppo_policy]]", "models.reference.num_workers=2")  # fmt: skip

    class Pairs(Reference):  # builds the data; rows in pairs (group_size 2) like preferences
        def build_dataset(self, prompts, is_eval=False):
            return Sampler.build_dataset(self, prompts)

        def forward_step(self, data, iteration=0):
            return {
                **super().forward_step(data),
                "sample": data["id"] % 2,
                "rewards": data["x"][:, 0],
            }

    engine = DPOEngine(Pairs("reference"), OldStyleTrainer("ppo_policy"))
    engine.set_dataset(list(range(NUM_ITEMS)))
    engine.learn()
    steps = events(read(log), "ppo_policy", "train")
    # One episode of 4 rows is one global batch: iteration 0 on both ranks, the old signature.
    assert sorted((s["rank"], s["iteration"], s["episode"]) for s in steps) == [
        (0, 0, -1),
        (1, 0, -1),
    ]
    assert all(step["sizes"] == [2] for step in steps)


def test_one_line_errors(ray_session, tmp_path) -> None:
    with pytest.raises(EngineError, match="Megatron-LM models are not supported"):
        MegatronModule("policy")
    init(tmp_path, tmp_path / "log.jsonl")
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

    init(tmp_path, tmp_path / "log.jsonl", "runtime.colocation=[]")  # 2 + 2 + 1 + 1 > 4 CPUs
    with pytest.raises(EngineError, match=r"need 6 CPUs .* but the Ray cluster has 4"):
        grpo_shaped_engine().learn()
    init(tmp_path, tmp_path / "log.jsonl", "runtime.colocation=[[policy, reward]]")
    with pytest.raises(EngineError, match=r"need the same models.<name>.num_workers"):
        grpo_shaped_engine().learn()
    with pytest.raises(ConfigError, match="runtime.sample_per_episode=5 must be a multiple"):
        init(tmp_path, tmp_path / "log.jsonl", "runtime.sample_per_episode=5")
