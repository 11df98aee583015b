"""Bad input is caught on the driver, before Ray or any worker starts, in one line naming the key."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rl_toolkit.algorithms.dpo import check_config
from rl_toolkit.config_schema import MasterConfig, resolve_local_paths
from rl_toolkit.distributed import virtual_cluster
from rl_toolkit.models.optim import check_optimizer_config
from rl_toolkit.utils.config import ConfigError, load_config
from rl_toolkit.utils.hf import check_policy_model, warn_if_random_init_of_trained_model

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "dpo_tiny.yaml"


def tiny(*overrides: str) -> MasterConfig:
    config = load_config(TINY, overrides, schema=MasterConfig)
    resolve_local_paths(config)
    return config


def one_line_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        check_config(tiny(*overrides))
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # max_grad_norm -1 used to clip to a negative norm: training went the wrong way.
        ("policy.max_grad_norm=-1", "'policy.max_grad_norm': input should be greater than 0"),
        ("dpo.val_period=-1", "'dpo.val_period': input should be greater than or equal to 0"),
        ("dpo.max_num_steps=-1", "'dpo.max_num_steps': input should be greater than or equal"),
        ("dpo.max_num_epochs=0", "'dpo.max_num_epochs': input should be greater than or equal"),
        ("policy.micro_batch.logprob=0", "'policy.micro_batch.logprob': input should be greater"),
        ("policy.logprob_chunk_size=0", "'policy.logprob_chunk_size': input should be greater"),
        ("policy.micro_batch.train=0", "'policy.micro_batch.train': input should be greater"),
        ("policy.micro_batch.unit=pairs", "'policy.micro_batch.unit': input should be 'tokens'"),
        ("data.pad_to_multiple_of=-8", "'data.pad_to_multiple_of': input should be greater"),
        ("dpo.ref_model_mixup_alpha=2", "'dpo.ref_model_mixup_alpha': input should be less than"),
    ],
)
def test_out_of_range_values_are_one_line_naming_the_key_and_range(
    override: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TINY, [override], schema=MasterConfig)
    message = str(error.value)
    assert expected in message and "(from the command line)" not in message.split(";")[0]
    assert "\n" not in message and "from the command line" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["policy.optimizer.kwargs.lr=0"], "policy.optimizer.kwargs.lr must be a number > 0"),
        (
            ["cluster.gpus_per_node=3"],
            "policy.train_global_batch_size=64 must split into whole pairs (2 sequences each) "
            "over 3 workers (cluster.gpus_per_node x cluster.num_nodes): use a multiple of 6",
        ),
        (
            [
                "cluster.num_nodes=3",
                "dpo.val_global_batch_size=8",
                "policy.train_global_batch_size=12",
            ],
            "dpo.val_global_batch_size=8 must split into whole pairs",
        ),
        (
            ["policy.micro_batch={unit: rows, train: 12, logprob: 32}"],
            "policy.micro_batch.train=12 rows must be even (whole pairs) and divide the 32 "
            "sequences each of the 2 workers gets",
        ),
        (
            ["dpo.sync_ref_model=true", "dpo.reference_free=true", "dpo.loss_type=simpo"],
            "dpo.sync_ref_model=true needs a reference model",
        ),
        (["dpo.label_smoothing=0.1", "dpo.loss_type=ipo"], "dpo.label_smoothing must be 0"),
        (["policy.attn_implementation=flashy"], "policy.attn_implementation='flashy'"),
        (["policy.optimizer.kwargs.momentum=0.9"], "policy.optimizer.kwargs do not fit"),
        (["policy.optimizer.name=torch.optim.Adamm"], "policy.optimizer.name: cannot import"),
        (
            ["policy.scheduler=[{name: torch.optim.lr_scheduler.LinearLR, kwargs: {warmup: 3}}]"],
            "policy.scheduler[0].kwargs do not fit torch.optim.lr_scheduler.LinearLR",
        ),
    ],
)
def test_rules_between_keys_fail_before_any_worker(overrides: list[str], expected: str) -> None:
    assert expected in one_line_error(*overrides)


def test_token_micro_batches_need_not_divide_anything() -> None:
    # Counted in tokens, micro-batches are cut by a budget; any size is fine.
    check_config(tiny("policy.micro_batch.train=333", "policy.micro_batch.logprob=77"))
    # The form not chosen cannot be set at all: there is one set of sizes and its unit.
    with pytest.raises(ConfigError, match="unknown key 'policy.train_micro_batch_size'"):
        tiny("policy.train_micro_batch_size=16")


def test_unwritable_output_folders_fail_at_start(tmp_path: Path) -> None:
    # A file where a folder must go: unwritable even for root, which ignores permissions.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = one_line_error(f"checkpointing.checkpoint_dir={blocker}/ckpt")
    assert message == (
        f"checkpointing.checkpoint_dir='{blocker}/ckpt' cannot be created: {blocker} is a file, "
        "not a folder"
    )
    assert "logger.log_dir=" in one_line_error(f"logger.log_dir={blocker}/deeper/logs")
    check_config(tiny(f"checkpointing.checkpoint_dir={tmp_path}/new/deeper/ckpt"))
    assert not (tmp_path / "new").exists()  # checking creates nothing
    # Disabled checkpointing writes nothing, so its folder is not checked.
    check_config(tiny(f"checkpointing.checkpoint_dir={blocker}/x", "checkpointing.enabled=false"))


def test_optimizer_dry_run_accepts_the_shipped_settings() -> None:
    for path in (REPO / "configs" / "dpo.yaml", TINY):
        check_optimizer_config(load_config(path, schema=MasterConfig)["policy"])


def test_relative_paths_resolve_from_the_repo_when_not_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tiny()
    assert config["policy"]["model_name"] == str(REPO / "assets" / "tiny_llama")
    assert config["policy"]["tokenizer"]["name"] == str(REPO / "assets" / "tiny_llama")
    assert config["data"]["train_data_path"] == str(REPO / "assets/tiny_prefs/train.jsonl")
    # A path that exists in the working directory wins; a hub name is left alone.
    (tmp_path / "assets" / "tiny_prefs").mkdir(parents=True)
    (tmp_path / "assets" / "tiny_prefs" / "train.jsonl").write_text("")
    config = tiny("policy.model_name=org/some-model")
    assert config["data"]["train_data_path"] == "assets/tiny_prefs/train.jsonl"
    assert config["policy"]["model_name"] == "org/some-model"


def test_a_config_without_weights_needs_random_init(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    config = tiny(f"policy.model_name={tmp_path}", "policy.random_init=false")
    with pytest.raises(
        ConfigError, match="holds a config but no weights .*policy.random_init=true"
    ):
        check_policy_model(config["policy"])
    check_policy_model(tiny()["policy"])  # random_init: true
    with pytest.raises(ConfigError, match="policy.model_name: 'assets/no_such_model' looks like"):
        check_policy_model(tiny("policy.model_name=assets/no_such_model")["policy"])


def test_random_init_of_a_hub_model_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        warn_if_random_init_of_trained_model(tiny()["policy"])  # no weights to throw away
        assert not caplog.records
        policy = tiny("policy.model_name=meta-llama/Llama-3.2-1B-Instruct")["policy"]
        warn_if_random_init_of_trained_model(policy)
    assert "training starts from RANDOM weights" in caplog.text


class FakeRay:
    """`ray.cluster_resources()` and `ray.nodes()` of a cluster, without Ray."""

    def __init__(self, gpus_per_node: list[int], cpus: int = 64) -> None:
        self.nodes_ = [{"Alive": True, "Resources": {"GPU": n}} for n in gpus_per_node]
        self.resources = {"CPU": cpus, "GPU": sum(gpus_per_node)}

    def cluster_resources(self) -> dict:
        return self.resources

    def nodes(self) -> list[dict]:
        return self.nodes_


@pytest.mark.parametrize(
    ("gpus", "cpus", "overrides", "expected"),
    [
        ([], 1, [], "= 2 workers, one CPU each, but the Ray cluster has 1 CPUs and no GPU"),
        ([], 8, ["policy.precision=bfloat16"], "policy.precision=bfloat16 needs GPU workers"),
        ([], 8, ["policy.fsdp.cpu_offload=true"], "policy.fsdp.cpu_offload=true needs GPU"),
        ([1], 8, [], "= 2 workers, one GPU each, but the Ray cluster has 1 GPUs"),
        ([1, 1], 8, [], "cluster.gpus_per_node=2, but no node of the Ray cluster has more than 1"),
    ],
)
def test_cluster_too_small_is_one_line_before_any_worker(
    monkeypatch: pytest.MonkeyPatch, gpus: list[int], cpus: int, overrides: list, expected: str
) -> None:
    monkeypatch.setattr(virtual_cluster, "ray", FakeRay(gpus, cpus))
    config = tiny(*overrides)
    with pytest.raises(ConfigError) as error:
        virtual_cluster.check_cluster_fits(config["cluster"], config["policy"])
    assert expected in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setattr(virtual_cluster, "ray", FakeRay([2], cpus))
    virtual_cluster.check_cluster_fits(config["cluster"], config["policy"])


def run_script(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_config_mistakes_are_reported_before_torch_ray_or_transformers_load(
    tmp_path: Path,
) -> None:
    # From another working directory, as a user would; the script exits before its imports.
    code = f"""
        import json, runpy, sys
        sys.argv = ["run_dpo.py", *sys.argv[1:]]
        try:
            runpy.run_path({str(REPO / "examples" / "run_dpo.py")!r}, run_name="__main__")
        except SystemExit as exit:
            heavy = [m for m in ("torch", "ray", "transformers") if m in sys.modules]
            print(json.dumps({{"code": exit.code, "heavy": heavy}}))
    """
    for override, heavy in (
        ("dpo.max_num_epochs=0", []),
        ("cluster.gpus_per_node=3", []),
        ("dpo.sft_los_weight=1", []),
        # The loss's own rules read its table of losses: torch, but still no Ray, no transformers.
        ("dpo.label_smoothing=0.1 dpo.loss_type=ipo", ["torch"]),
    ):
        result = run_script(code, tmp_path, *override.split())
        assert json.loads(result.stdout) == {"code": 2, "heavy": heavy}, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_a_bug_keeps_its_traceback_and_is_not_called_a_config_error(tmp_path: Path) -> None:
    code = f"""
        import sys
        from rl_toolkit.config_schema import MasterConfig
        from rl_toolkit.utils.config import run_cli_with_config

        def main(config):
            raise ValueError("a bug, not a user mistake")

        run_cli_with_config(main, sys.argv[1:], {str(TINY)!r}, "test", MasterConfig)
    """
    result = run_script(code, tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "a bug, not a user mistake" in result.stderr
